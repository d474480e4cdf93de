"""Hugging Face ``transformers`` CLIP checkpoints <-> the open_clip key layout.

Reads a ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` / ``CLIPModel`` directory (``config.json``
and ``model.safetensors`` or ``pytorch_model.bin``, sharded or not) or state dict without importing
``transformers``: the conversion is a key mapping (q/k/v projections fused into ``in_proj_*``,
``visual_projection`` / ``text_projection`` transposed into ``proj`` / ``text_projection``), and the
activation is read from ``config.json`` (``hidden_act: quick_gelu`` for OpenAI's weights).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

StateDict = dict[str, torch.Tensor]

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# transformers' CLIPVisionConfig / CLIPTextConfig default activation (omitted from diff-saved configs).
_DEFAULT_ACT = "quick_gelu"
_TOWERS = {"vision_model.": "visual.", "text_model.": ""}
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
_LAYER_PARTS = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                "self_attn.out_proj": "attn.out_proj"}
_TOWER_PARTS = {
    "vision_model.": {"embeddings.class_embedding": "class_embedding",
                      "embeddings.patch_embedding.weight": "conv1.weight",
                      "embeddings.position_embedding.weight": "positional_embedding",
                      "pre_layrnorm.weight": "ln_pre.weight", "pre_layrnorm.bias": "ln_pre.bias",
                      "post_layernorm.weight": "ln_post.weight", "post_layernorm.bias": "ln_post.bias"},
    "text_model.": {"embeddings.token_embedding.weight": "token_embedding.weight",
                    "embeddings.position_embedding.weight": "positional_embedding",
                    "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"},
}
_PROJECTIONS = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
_IGNORED = re.compile(r"^(vision_model|text_model)\.embeddings\.position_ids$")  # a buffer, not a weight


# A CLIPVisionModel saved by transformers >= 5 has its vision tower's keys without "vision_model.".
_BARE_VISION = ("embeddings.patch_embedding.", "pre_layrnorm.")


def is_hf_state_dict(state: Mapping[str, object]) -> bool:
    """True if the keys are those of a ``transformers`` CLIP model (a vision or text tower)."""
    prefixes = ("vision_model.embeddings.", "text_model.embeddings.", *_BARE_VISION)
    return any(k.startswith(prefixes) for k in state)


def is_hf_directory(path: str | os.PathLike) -> bool:
    """True if ``path`` is a directory with ``config.json`` and a weight file ``save_pretrained`` writes."""
    path = Path(path)
    has_weights = any((path / f).is_file() for f in WEIGHT_FILES)
    return path.is_dir() and (path / "config.json").is_file() and has_weights


def hf_to_open_clip(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Map a ``transformers`` CLIP state dict to open_clip's keys, every tensor accounted for.

    A full ``CLIPModel`` gives a full open_clip CLIP state dict (``visual.*`` and the text tower); a vision
    model gives ``model.visual.state_dict()`` keys (no ``proj`` without ``visual_projection``).
    """
    if any(k.startswith(_BARE_VISION) for k in state):
        state = {k if k.startswith("visual_projection.") else f"vision_model.{k}": v
                 for k, v in state.items()}
    state = {k: v for k, v in state.items() if not _IGNORED.match(k)}
    unknown = [k for k in state if not k.startswith(tuple(_TOWERS)) and k not in _PROJECTIONS
               and k != "logit_scale"]
    if unknown:
        raise ValueError(f"not a Hugging Face CLIP state dict: unexpected key {unknown[0]!r}"
                         + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    full = any(k.startswith("text_model.") for k in state)
    out: StateDict = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        tower = next((t for t in _TOWERS if key.startswith(t)), None)
        if tower is None:
            name = "logit_scale" if key == "logit_scale" else _PROJECTIONS[key]
            out[name] = value if key == "logit_scale" else value.T.contiguous()
            continue
        rest = key[len(tower):]
        prefix = _TOWERS[tower] if full else ""
        if rest in _TOWER_PARTS[tower]:
            out[prefix + _TOWER_PARTS[tower][rest]] = value
            continue
        match = _LAYER.match(rest)
        if match is None:
            raise ValueError(f"Hugging Face CLIP key {key!r} has no open_clip counterpart")
        block, part = f"{prefix}transformer.resblocks.{match.group(1)}.", match.group(2)
        qkv = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", part)
        if qkv:
            fused.setdefault(f"{block}attn.in_proj_{qkv.group(2)}", {})[qkv.group(1)] = value
            continue
        module, _, leaf = part.rpartition(".")
        if module not in _LAYER_PARTS:
            raise ValueError(f"Hugging Face CLIP key {key!r} has no open_clip counterpart")
        out[f"{block}{_LAYER_PARTS[module]}.{leaf}"] = value
    for name, parts in fused.items():
        if sorted(parts) != ["k", "q", "v"]:
            missing = sorted({"q", "k", "v"} - set(parts))
            raise ValueError(f"{name}: the Hugging Face checkpoint lacks the {missing} projection(s)")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if not full and "visual.proj" in out:
        out["proj"] = out.pop("visual.proj")
    return out


def open_clip_to_hf(state: Mapping[str, torch.Tensor]) -> StateDict:
    """The inverse of :func:`hf_to_open_clip`: an open_clip image-encoder (or full CLIP) state dict with
    ``transformers`` CLIP keys (``CLIPVisionModelWithProjection`` / ``CLIPModel``)."""
    full = any(k.startswith("visual.") for k in state) and not all(k.startswith("visual.") for k in state)
    towers = _TOWERS if full else {"vision_model.": ""}
    inverse = {prefix + v: tower + k for tower, prefix in towers.items()
               for k, v in _TOWER_PARTS[tower].items()}
    out: StateDict = {}
    for key, value in state.items():
        if key in inverse:
            out[inverse[key]] = value
            continue
        if key in ("proj", "visual.proj", "text_projection"):
            out["text_projection.weight" if key == "text_projection" else "visual_projection.weight"] = \
                value.T.contiguous()
            continue
        if key == "logit_scale":
            out[key] = value
            continue
        match = re.match(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$", key)
        if match is None:
            raise ValueError(f"open_clip key {key!r} has no Hugging Face CLIP counterpart")
        tower = "vision_model." if (match.group(1) or not full) else "text_model."
        block, part = f"{tower}encoder.layers.{match.group(2)}.", match.group(3)
        fused = re.match(r"^attn\.in_proj_(weight|bias)$", part)
        if fused:
            for letter, chunk in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[f"{block}self_attn.{letter}_proj.{fused.group(1)}"] = chunk.contiguous()
            continue
        module, _, leaf = part.rpartition(".")
        names = {v: k for k, v in _LAYER_PARTS.items()}
        if module not in names:
            raise ValueError(f"open_clip key {key!r} has no Hugging Face CLIP counterpart")
        out[f"{block}{names[module]}.{leaf}"] = value
    return out


def _read_weights(path: Path) -> StateDict:
    from safetensors.torch import load_file

    for name in WEIGHT_FILES:
        file = path / name
        if not file.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
            state: StateDict = {}
            for shard in shards:
                state.update(_read_file(path / shard, load_file))
            return state
        return _read_file(file, load_file)
    raise FileNotFoundError(f"{str(path)!r} holds none of {list(WEIGHT_FILES)}")


def _read_file(file: Path, load_file) -> StateDict:
    try:
        if file.suffix == ".safetensors":
            return load_file(str(file))
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{str(file)!r} is not a readable weight file (truncated or corrupt?): "
                         f"{type(err).__name__}: {err}") from err


def hf_quick_gelu(config: Mapping[str, object]) -> bool:
    """Whether a CLIP ``config.json`` (vision model or full CLIPModel) uses QuickGELU in its vision tower."""
    vision = config.get("vision_config", config)
    act = vision.get("hidden_act", _DEFAULT_ACT) if isinstance(vision, Mapping) else _DEFAULT_ACT
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"hidden_act {act!r}: open_clip towers use quick_gelu or gelu")
    return act == "quick_gelu"


def read_hf_directory(path: str | os.PathLike) -> tuple[StateDict, bool]:
    """A ``save_pretrained`` CLIP directory as an open_clip state dict, and whether it uses QuickGELU."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path / 'config.json')!r} is not valid JSON: {err}") from err
    model_type = config.get("model_type")
    if model_type not in ("clip", "clip_vision_model"):
        raise ValueError(f"{str(path)!r}: config.json model_type is {model_type!r}; only CLIP models "
                         "('clip', 'clip_vision_model') can be read")
    return hf_to_open_clip(_read_weights(path)), hf_quick_gelu(config)
