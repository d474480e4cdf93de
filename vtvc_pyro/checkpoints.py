"""Local checkpoint I/O for open_clip CLIP models: safetensors, ``weights_only`` torch files, Hugging Face
CLIP directories, OpenAI's TorchScript archives, and (opt-in) the pickled ``ImageEncoder`` /
``ClassificationHead`` modules of the task-arithmetic papers; conversion to safetensors; offline models.

Every state dict returned here is keyed like open_clip's ``model.visual.state_dict()`` (image encoders) or
``model.state_dict()`` (full CLIP models). Each reader also reports the activation the file states
(``quick_gelu``), so that :func:`create_model` builds the tower the weights were trained with.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vtvc_pyro.hf_clip import (
    WEIGHT_FILES,
    hf_to_open_clip,
    is_hf_directory,
    is_hf_state_dict,
    read_hf_directory,
)
from vtvc_pyro.io import atomic_path, sha256_file
from vtvc_pyro.pickles import (
    LEGACY_PICKLE_MODULE,
    AllowlistUnpickler,
    is_torchscript,
    quick_gelu_of,
    read_torchscript,
)

StateDict = dict[str, torch.Tensor]

_SAFETENSORS_FORMAT = "vtvc_pyro.image_encoder"
_ORDER_KEY = "vtvc_pyro.key_order"
_PAPERS_PACKAGES = ("src", "modeling")
_VISUAL_PREFIX = re.compile(r"^((?:[^.]+\.)*?visual\.)")
# Entries of OpenAI's TorchScript CLIP that are not weights (open_clip rebuilds them; it drops them too).
_SCRIPT_NON_WEIGHTS = re.compile(r"^(input_resolution|context_length|vocab_size|(.*\.)?attn_mask)$")


class LegacyPickleError(ValueError):
    """A checkpoint holds pickled Python objects (a legacy whole-module checkpoint) and was not opted in."""


@dataclass
class Checkpoint:
    """A checkpoint read by :func:`read_checkpoint`.

    ``state_dict``: open_clip keys (a full CLIP or an image encoder), ``module.`` stripped. ``quick_gelu``:
    what the file states about its activation (None: it does not say). ``kind``: ``safetensors``, ``torch``,
    ``pickle``, ``torchscript`` or ``hf``. ``module``: the unpickled module of a legacy pickle.
    """

    state_dict: StateDict
    quick_gelu: bool | None
    kind: str
    module: torch.nn.Module | None = None

    @property
    def is_full_clip(self) -> bool:
        keys = list(self.state_dict)
        return any(k.startswith("visual.") for k in keys) and not all(k.startswith("visual.") for k in keys)


# ---------------------------------------------------------------------------- reading


def _describe(path: Path) -> str:
    return repr(str(path))


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _key_order(metadata: Mapping[str, str], keys: list[str]) -> list[str]:
    """The state-dict order recorded by :func:`save_state_dict` (safetensors itself sorts the keys)."""
    recorded = json.loads(metadata.get(_ORDER_KEY, "[]"))
    return recorded if sorted(recorded) == sorted(keys) else list(keys)


def _flag(value: Any, where: str) -> bool | None:
    """A recorded ``quick_gelu`` value (bool, or its JSON text in safetensors metadata) as a bool."""
    if value is None or isinstance(value, bool):
        return value
    if value in ("true", "false"):
        return value == "true"
    raise ValueError(f"{where}: quick_gelu must be true or false, got {value!r}")


def _is_legacy_torch_file(path: Path) -> bool:
    """True if the file starts like pre-1.6 ``torch.save`` output: a pickled magic number (a long int)."""
    with open(path, "rb") as handle:
        head = handle.read(3)
    return head[:2] == b"\x80\x02" and head[2:3] == b"\x8a"  # PROTO 2, LONG1


def _unpickle(path: Path, err: Exception, trust_pickle: bool, map_location: Any) -> Any:
    """Load a legacy pickle (after ``weights_only`` refused it) through the allowlist unpickler."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        unsafe.sort(key=lambda g: g.split(".")[0] not in _PAPERS_PACKAGES)  # the papers' classes first
    except Exception:  # not a zip checkpoint: the pre-1.6 pickle format
        unsafe = ["(unknown: pre-zip torch format)"]
    if not unsafe:
        raise ValueError(f"{_describe(path)} is not a readable torch checkpoint: {err}") from err
    if not trust_pickle:
        raise LegacyPickleError(
            f"{_describe(path)} is a legacy pickle: it stores Python objects ({', '.join(unsafe[:4])}), "
            "which safe loading refuses. If you trust the file, pass trust_pickle=True "
            "(`--trust-pickle` on the command line), or convert it once with "
            "`vtvc convert --trust-pickle SRC DST.safetensors`."
        ) from None
    try:
        if not zipfile.is_zipfile(path) and not _is_legacy_torch_file(path):  # plain pickle.dump (old heads)
            with open(path, "rb") as handle:
                return AllowlistUnpickler(handle).load()
        return torch.load(path, map_location=map_location, weights_only=False,
                          pickle_module=LEGACY_PICKLE_MODULE)
    except Exception as exc:
        raise ValueError(f"{_describe(path)}: cannot unpickle the legacy checkpoint: "
                         f"{type(exc).__name__}: {exc}") from exc


def _read_torch(path: Path, trust_pickle: bool, map_location: Any) -> tuple[Any, str]:
    if is_torchscript(path):
        try:
            return read_torchscript(path), "torchscript"
        except Exception as err:
            raise ValueError(f"{_describe(path)} is a TorchScript archive this reader cannot parse without "
                             f"running its code ({type(err).__name__}: {err}); see experiments/README.md for "
                             "converting it with open_clip") from err
    try:
        with warnings.catch_warnings():  # plain pickle.dump files: torch warns about their protocol
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True), "torch"
    except pickle.UnpicklingError as err:
        return _unpickle(path, err, trust_pickle, map_location), "pickle"
    except Exception as err:  # truncated zip, garbage bytes, empty file, ...
        raise ValueError(f"{_describe(path)} is not a readable torch checkpoint (truncated or corrupt?): "
                         f"{type(err).__name__}: {err}") from err


def _from_torchscript(path: Path, state: StateDict, classes: set[str]) -> tuple[StateDict, bool | None]:
    """OpenAI's TorchScript CLIP: weights only, floating point cast to float32 (as open_clip loads them)."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()
             if not _SCRIPT_NON_WEIGHTS.match(k)}
    if not state:
        raise ValueError(f"{_describe(path)} is a TorchScript archive without weights")
    return state, True if "QuickGELU" in classes else (False if "GELU" in classes else None)


def _check_state(path: Path, obj: Any) -> StateDict:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{_describe(path)} holds a {type(obj).__name__}, not a state dict of tensors")
    if not obj:
        raise ValueError(f"{_describe(path)} holds an empty state dict")
    bad = [(k, type(v).__name__) for k, v in obj.items()
           if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        more = f" (and {len(bad) - 1} more non-tensor entries)" if len(bad) > 1 else ""
        raise ValueError(f"{_describe(path)} is not a state dict of tensors: "
                         f"entry {bad[0][0]!r} is a {bad[0][1]}{more}")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def read_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False,
                    map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read any supported checkpoint into open_clip keys, with the activation the file states.

    Files: safetensors (``quick_gelu`` metadata), torch files loadable with ``weights_only=True``
    (``{"state_dict": ..., "quick_gelu": bool}`` states the activation), TorchScript archives (OpenAI's
    ``ViT-B-32.pt``: read without running code from the file), legacy pickled modules (only with
    ``trust_pickle``; allowlisted globals only). Directories: Hugging Face CLIP ``save_pretrained`` output.
    Hugging Face CLIP keys are mapped to open_clip's wherever they appear.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {_describe(path)} does not exist")
    if path.is_dir():
        if not is_hf_directory(path):
            raise ValueError(f"checkpoint {_describe(path)} is a directory: give a checkpoint file, or a "
                             f"Hugging Face CLIP directory with config.json and one of {list(WEIGHT_FILES)}")
        state, quick_gelu = read_hf_directory(path)
        return Checkpoint({k: v.to(map_location) for k, v in state.items()}, quick_gelu, "hf")
    if not path.is_file():
        raise ValueError(f"checkpoint {_describe(path)} is not a regular file")
    module, quick_gelu = None, None
    if _is_safetensors(path):
        kind = "safetensors"
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                obj = {k: f.get_tensor(k) for k in _key_order(metadata, f.keys())}
        except Exception as err:  # safetensors raises its own error type
            raise ValueError(f"{_describe(path)} is not a readable safetensors file (truncated or corrupt?): "
                             f"{err}") from err
        quick_gelu = _flag(metadata.get("quick_gelu"), f"{_describe(path)} metadata")
        if map_location is not None:
            obj = {k: v.to(map_location) for k, v in obj.items()}
    else:
        obj, kind = _read_torch(path, trust_pickle, map_location)
        if kind == "torchscript":
            obj, quick_gelu = _from_torchscript(path, *obj)
        elif isinstance(obj, torch.nn.Module):
            module, quick_gelu = obj, quick_gelu_of(obj)
            obj = obj.state_dict()
        elif isinstance(obj, Mapping) and "state_dict" in obj:
            quick_gelu = _flag(obj.get("quick_gelu"), f"{_describe(path)} entry 'quick_gelu'")
            obj = obj["state_dict"]
    state = _check_state(path, obj)
    if is_hf_state_dict(state):
        state = hf_to_open_clip(state)
    return Checkpoint(state, quick_gelu, kind, module)


def image_encoder_state_dict(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Re-key a state dict like ``model.visual.state_dict()``: strip ``module.``, and keep only the image
    tower of a full CLIP (``visual.*``) or legacy ``ImageEncoder`` (``model.visual.*``) state dict."""
    state = dict(state_dict)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    prefixes = {m.group(1) for k in state if (m := _VISUAL_PREFIX.match(k))}
    if not prefixes:
        return state
    if len(prefixes) > 1:
        raise ValueError(f"state dict holds several image towers (prefixes {sorted(prefixes)})")
    prefix = prefixes.pop()
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_state_dict(path: str | os.PathLike, *, trust_pickle: bool = False,
                    map_location: str | torch.device = "cpu") -> StateDict:
    """Load an image-encoder state dict from any checkpoint :func:`read_checkpoint` reads.

    Unwraps ``{"state_dict": ...}``, strips ``module.`` / ``visual.`` / ``model.visual.`` prefixes and drops
    the text tower of a full CLIP state dict. Legacy pickled modules load only with ``trust_pickle=True``.
    """
    return image_encoder_state_dict(read_checkpoint(path, trust_pickle=trust_pickle,
                                                    map_location=map_location).state_dict)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (empty for other files)."""
    path = Path(path)
    if not path.is_file() or not _is_safetensors(path):
        return {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception as err:
        raise ValueError(f"{_describe(path)} is not a readable safetensors file: {err}") from err


# ---------------------------------------------------------------------------- writing


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None) -> None:
    """Write a state dict as safetensors, atomically, recording its key order (safetensors sorts keys).

    Views are copied so that no two tensors share memory.
    """
    meta = {"format": _SAFETENSORS_FORMAT, **(metadata or {}), _ORDER_KEY: json.dumps(list(state_dict))}
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise ValueError(f"safetensors metadata must map strings to strings; offending keys: {bad}")
    tensors = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"cannot save {k!r}: it is a {type(v).__name__}, not a tensor")
        v = v.detach().to("cpu")
        owns_storage = v.is_contiguous() and v.untyped_storage().nbytes() == v.numel() * v.element_size()
        tensors[k] = v if owns_storage else v.contiguous().clone()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _papers_head(src: Path, module: torch.nn.Module, class_names: Sequence[str] | str | os.PathLike | None,
                 data_root: str | os.PathLike | None):
    """The papers' pickled ``ClassificationHead`` (``head_<Dataset>.pt``) as a :class:`ClassificationHead`."""
    from vtvc_pyro.heads import ClassificationHead
    from vtvc_pyro.standard_tasks import STANDARD_TASKS, standard_class_names

    if isinstance(class_names, (str, os.PathLike)):
        names_file = Path(class_names)
        if not names_file.is_file():
            raise FileNotFoundError(f"class-names file {_describe(names_file)} does not exist")
        class_names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    if class_names is None:
        dataset = re.sub(r"Val$", "", src.stem.removeprefix("head_"))
        if dataset not in STANDARD_TASKS:
            raise ValueError(f"{_describe(src)}: cannot tell the dataset from the file name (head_<Dataset>"
                             f".pt, one of {list(STANDARD_TASKS)}); pass the class names (--class-names)")
        class_names = standard_class_names(dataset, data_root)
    state = module.state_dict()
    return ClassificationHead.from_papers(state.get("weight"), state.get("bias"),
                                          getattr(module, "normalize", None), class_names, source=str(src))


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, trust_pickle: bool = False,
                       overwrite: bool = False, class_names: Sequence[str] | str | os.PathLike | None = None,
                       data_root: str | os.PathLike | None = None,
                       base: str | os.PathLike | None = None) -> str:
    """Convert any checkpoint :func:`read_checkpoint` reads to safetensors; returns a one-line summary.

    A full CLIP stays a full CLIP (``zoo.clip``), anything else becomes an image-encoder state dict; the
    metadata records the source's name, SHA-256 and format and the activation it states (``quick_gelu``,
    which :func:`create_model` reads). The papers' pickled ``ClassificationHead`` becomes a head file
    (:class:`vtvc_pyro.heads.ClassificationHead`); its class names come from ``class_names`` (a list, or a
    file with one per line), or from the standard dataset ``head_<Dataset>.pt`` names (Cars, DTD and SUN397
    need ``data_root``). ``base``: a checkpoint that supplies the tensors the source lacks, e.g. the
    ``proj`` of a ``CLIPVisionModel`` (FusionBench's fine-tuned models), taken from the pre-trained CLIP
    they were fine-tuned from; the metadata lists them (``filled_from``).
    """
    src, dst = Path(src), Path(dst)
    if dst.is_dir():
        raise ValueError(f"output {_describe(dst)} is a directory: give a file path, e.g. "
                         f"{dst / (src.stem + '.safetensors')}")
    if dst.exists() and not overwrite:
        raise ValueError(f"{_describe(dst)} exists; pass overwrite=True (`--force`) to replace it")
    ckpt = read_checkpoint(src, trust_pickle=trust_pickle)
    if ckpt.module is not None and type(ckpt.module).__name__ == "ClassificationHead":
        head = _papers_head(src, ckpt.module, class_names, data_root)
        head.save(dst)
        return (f"wrote {dst}: zero-shot head with {head.num_classes} classes, "
                f"logit scale {head.logit_scale:.6g}")
    state = ckpt.state_dict if ckpt.is_full_clip else image_encoder_state_dict(ckpt.state_dict)
    meta = {"source": src.name, "source_sha256": sha256_file(src), "source_format": ckpt.kind}
    if ckpt.quick_gelu is not None:
        meta["quick_gelu"] = json.dumps(ckpt.quick_gelu)
    filled: list[str] = []
    if base is not None:
        base_state = read_checkpoint(base, trust_pickle=trust_pickle).state_dict
        if not ckpt.is_full_clip:
            base_state = image_encoder_state_dict(base_state)
        filled = [k for k in base_state if k not in state]
        state = {**{k: state.get(k, base_state[k]) for k in base_state}, **state}
        meta["filled_from"] = json.dumps({"source": Path(base).name, "keys": filled})
    save_state_dict(state, dst, meta)
    activation = {None: "activation not recorded", True: "QuickGELU", False: "GELU"}[ckpt.quick_gelu]
    taken = f"; {len(filled)} taken from {Path(base).name}: {', '.join(filled)}" if filled else ""
    return (f"wrote {dst}: {'full CLIP' if ckpt.is_full_clip else 'image encoder'} state dict, "
            f"{len(state)} tensors, from a {ckpt.kind} checkpoint ({activation}){taken}")


# ---------------------------------------------------------------------------- models


def register_model_config(json_path: str | os.PathLike) -> str:
    """Register an open_clip architecture from a JSON file (file stem = model name); returns the name."""
    path = Path(json_path)
    if not path.is_file():
        raise FileNotFoundError(f"model config {_describe(path)} does not exist")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"model config {_describe(path)} is not valid JSON: {err}") from err
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise ValueError(f"model config {_describe(path)} lacks {missing}")
    open_clip.add_model_config(path)
    return path.stem


@contextlib.contextmanager
def _drop_log_records(prefix: str):
    """Drop root-logger records whose message starts with ``prefix`` for the duration of the block."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(prefix)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _activation(quick_gelu: bool | None) -> str:
    return "QuickGELU" if quick_gelu else "GELU"


def create_model(name: str, *, pretrained: str | os.PathLike | None = None, quick_gelu: bool | None = None,
                 device: str | torch.device = "cpu", trust_pickle: bool = False) -> torch.nn.Module:
    """Create an open_clip CLIP offline by architecture name and optionally load local weights.

    ``pretrained``: any checkpoint :func:`read_checkpoint` reads, holding a full CLIP or an image encoder
    (loaded into ``model.visual``; the text tower then keeps its initialisation). The activation is what the
    checkpoint states (pickled modules, TorchScript classes, safetensors metadata, an explicit ``quick_gelu``
    entry, Hugging Face ``hidden_act``), else the architecture's. A name that states one (``*-quickgelu``
    configs) or an explicit ``quick_gelu`` argument contradicting the checkpoint is refused, naming both.
    """
    if name.startswith("hf-hub:"):
        raise ValueError(f"model {name!r}: hub models need a download; register a local config instead")
    config = open_clip.get_model_config(name)
    if config is None:
        raise ValueError(f"unknown open_clip architecture {name!r}; register tiny configs with "
                         "register_model_config(json_path)")
    ckpt = read_checkpoint(pretrained, trust_pickle=trust_pickle) if pretrained is not None else None
    stated = ckpt.quick_gelu if ckpt is not None else None
    named = config.get("quick_gelu")
    if stated is not None and named is not None and bool(named) != stated:
        alternative = name.removesuffix("-quickgelu") if named else f"{name}-quickgelu"
        raise ValueError(f"model {name!r} uses {_activation(named)} but {str(pretrained)!r} was saved from a "
                         f"model with {_activation(stated)}; use model {alternative!r} (or the checkpoint "
                         "meant for this architecture)")
    if stated is not None and quick_gelu is not None and quick_gelu != stated:
        raise ValueError(f"quick_gelu={quick_gelu} contradicts {str(pretrained)!r}, which was saved from a "
                         f"model with {_activation(stated)} (quick_gelu={stated})")
    chosen = quick_gelu if quick_gelu is not None else stated
    kwargs = {} if chosen is None else {"quick_gelu": chosen}
    # open_clip logs that the model is randomly initialised; not true when we load weights just below
    with _drop_log_records("No pretrained weights loaded") if ckpt else contextlib.nullcontext():
        model = open_clip.create_model(name, pretrained=None, **kwargs)
    if ckpt is not None:
        full = ckpt.is_full_clip
        target = model if full else model.visual
        try:
            target.load_state_dict(ckpt.state_dict if full else image_encoder_state_dict(ckpt.state_dict),
                                   strict=True)
        except RuntimeError as err:
            raise ValueError(f"{str(pretrained)!r} does not fit architecture {name!r}: {err}") from err
    return model.to(device)
