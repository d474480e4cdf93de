"""Local checkpoint I/O for open_clip image encoders: safetensors, ``weights_only`` torch files, and (opt-in)
the pickled ``ImageEncoder`` modules of the task-arithmetic papers, plus offline model creation.

Every state dict returned here is keyed like ``model.visual.state_dict()``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import open_clip
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vtvc_pyro.io import atomic_path, sha256_file

StateDict = dict[str, torch.Tensor]

_SAFETENSORS_FORMAT = "vtvc_pyro.image_encoder"
_ORDER_KEY = "vtvc_pyro.key_order"
# Old open_clip class names -> current ones (open_clip 2.0.2, pinned by mlfoundations/task_vectors, vs now).
_OPEN_CLIP_RENAMES = {"VisualTransformer": "VisionTransformer"}
_OPEN_CLIP_HOMES = ("open_clip.transformer", "open_clip.model", "open_clip.modified_resnet",
                    "open_clip.timm_model", "open_clip.hf_model")
_LEGACY_PACKAGES = ("src", "modeling")  # mlfoundations/task_vectors and fredzzhang/atlas: src.modeling.*
_VISUAL_PREFIX = re.compile(r"^((?:[^.]+\.)*?visual\.)")


class LegacyPickleError(ValueError):
    """A checkpoint holds pickled Python objects (a legacy whole-module checkpoint) and was not opted in."""


# ---------------------------------------------------------------------------- legacy pickles


class _LegacyStandIn(torch.nn.Module):
    """Stand-in for a class that no longer resolves: the papers' ``src`` package (``ImageEncoder``,
    ``ClassificationHead``, ...) or anything else a legacy pickle names (old preprocessing helpers).

    Unpickling fills its ``__dict__`` (submodules, parameters, buffers): all that reading weights needs.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} is a stand-in for reading legacy weights only")


_STAND_INS: dict[str, type] = {}


def _stand_in(module: str, name: str) -> type:
    key = f"{module}.{name}"
    if key not in _STAND_INS:
        attrs = {"__qualname__": name, "__doc__": f"Stand-in for {key}."}
        _STAND_INS[key] = type(name, (_LegacyStandIn,), attrs)
    return _STAND_INS[key]


class _LegacyUnpickler(pickle.Unpickler):
    """Resolves the papers' ``src.modeling`` classes to stand-ins, old open_clip names to current ones and
    other names that no longer exist (outside torch) to stand-ins, without touching ``sys.modules``."""

    def find_class(self, module: str, name: str) -> Any:
        package = module.split(".")[0]
        if package in _LEGACY_PACKAGES:
            return _stand_in(module, name)
        homes = [module]
        if package == "open_clip":
            name = _OPEN_CLIP_RENAMES.get(name, name)
            homes += _OPEN_CLIP_HOMES
        for home in homes:
            try:
                return super().find_class(home, name)
            except (AttributeError, ImportError):
                continue
        if package == "torch":  # tensors and modules must resolve for real
            return super().find_class(module, name)
        return _stand_in(module, name)


_LEGACY_PICKLE_MODULE = SimpleNamespace(
    __name__="vtvc_pyro_legacy_pickle",
    Unpickler=_LegacyUnpickler,
    load=lambda f, **kwargs: _LegacyUnpickler(f, **kwargs).load(),
)


def _quick_gelu_of(module: torch.nn.Module) -> bool | None:
    """True if the module uses open_clip's QuickGELU, False if it uses GELU, None if it has neither."""
    kinds = {type(m).__name__ for m in module.modules()}
    if "QuickGELU" in kinds:
        return True
    return False if "GELU" in kinds else None


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


def _read_torch(path: Path, trust_pickle: bool, map_location: Any) -> tuple[Any, dict[str, str]]:
    try:
        return torch.load(path, map_location=map_location, weights_only=True), {}
    except pickle.UnpicklingError as err:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            unsafe.sort(key=lambda g: g.split(".")[0] not in _LEGACY_PACKAGES)  # the papers' classes first
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
    except Exception as err:  # truncated zip, garbage bytes, empty file, ...
        raise ValueError(f"{_describe(path)} is not a readable torch checkpoint (truncated or corrupt?): "
                         f"{type(err).__name__}: {err}") from err
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False,
                         pickle_module=_LEGACY_PICKLE_MODULE)
    except Exception as err:
        raise ValueError(f"{_describe(path)}: cannot unpickle the legacy checkpoint: "
                         f"{type(err).__name__}: {err}") from err
    info = {"legacy_class": f"{type(obj).__module__}.{type(obj).__qualname__}"}
    if isinstance(obj, torch.nn.Module):
        quick_gelu = _quick_gelu_of(obj)
        if quick_gelu is not None:
            info["quick_gelu"] = json.dumps(quick_gelu)
    return obj, info


def _read(path: str | os.PathLike, trust_pickle: bool, map_location: Any) -> tuple[StateDict, dict[str, str]]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict (unwrapped, ``module.`` stripped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {_describe(path)} does not exist" if not path.exists()
                                else f"checkpoint {_describe(path)} is not a file")
    info: dict[str, str] = {}
    if _is_safetensors(path):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                info = dict(f.metadata() or {})
                obj = {k: f.get_tensor(k) for k in _key_order(info, f.keys())}
        except Exception as err:  # safetensors raises its own error type
            raise ValueError(f"{_describe(path)} is not a readable safetensors file (truncated or corrupt?): "
                             f"{err}") from err
        if map_location is not None:
            obj = {k: v.to(map_location) for k, v in obj.items()}
    else:
        obj, info = _read_torch(path, trust_pickle, map_location)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
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
    return state, info


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
    """Load an image-encoder state dict from a ``.safetensors`` or torch file (``weights_only=True``).

    Unwraps ``{"state_dict": ...}``, strips ``module.`` / ``visual.`` / ``model.visual.`` prefixes and drops
    the text tower of a full CLIP state dict. Legacy pickled modules load only with ``trust_pickle=True``.
    """
    state, _ = _read(path, trust_pickle, map_location)
    return image_encoder_state_dict(state)


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


def convert_legacy_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, trust_pickle: bool,
                              overwrite: bool = False) -> StateDict:
    """Convert a (legacy pickled) image-encoder checkpoint to a safetensors image-encoder state dict.

    The metadata records the source file's name and SHA-256 and, when it can be read off the pickled
    modules, whether the encoder uses QuickGELU (:func:`create_model` picks that up). Returns the state dict.
    """
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise ValueError(f"{_describe(dst)} exists; pass overwrite=True (`--force`) to replace it")
    state, info = _read(src, trust_pickle, "cpu")
    state = image_encoder_state_dict(state)
    meta = {"source": Path(src).name, "source_sha256": sha256_file(src)}
    if "quick_gelu" in info:
        meta["quick_gelu"] = info["quick_gelu"]
    save_state_dict(state, dst, meta)
    return state


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


def create_model(name: str, *, pretrained: str | os.PathLike | None = None, quick_gelu: bool | None = None,
                 device: str | torch.device = "cpu", trust_pickle: bool = False) -> torch.nn.Module:
    """Create an open_clip CLIP offline by architecture name and optionally load local weights.

    ``pretrained``: a local file holding a full CLIP state dict or an image-encoder one (loaded into
    ``model.visual``; the text tower then keeps its initialisation). ``quick_gelu=None`` takes the
    activation from the checkpoint's metadata (written by :func:`convert_legacy_checkpoint`), else from the
    architecture config; an explicit value overrides both (with a warning if it contradicts the file).
    """
    if name.startswith("hf-hub:"):
        raise ValueError(f"model {name!r}: hub models need a download; register a local config instead")
    if open_clip.get_model_config(name) is None:
        raise ValueError(f"unknown open_clip architecture {name!r}; register tiny configs with "
                         "register_model_config(json_path)")
    if pretrained is not None and not Path(pretrained).is_file():
        raise FileNotFoundError(f"pretrained checkpoint {str(pretrained)!r} does not exist")
    recorded = read_metadata(pretrained).get("quick_gelu") if pretrained is not None else None
    recorded_flag = None if recorded is None else bool(json.loads(recorded))
    if quick_gelu is not None and recorded_flag is not None and quick_gelu != recorded_flag:
        warnings.warn(f"quick_gelu={quick_gelu} contradicts {str(pretrained)!r}, which was saved from a "
                      f"model with quick_gelu={recorded_flag}", UserWarning, stacklevel=2)
    chosen = quick_gelu if quick_gelu is not None else recorded_flag
    kwargs = {} if chosen is None else {"quick_gelu": chosen}
    # open_clip logs that the model is randomly initialised; not true when we load weights just below
    loads_weights = pretrained is not None
    with _drop_log_records("No pretrained weights loaded") if loads_weights else contextlib.nullcontext():
        model = open_clip.create_model(name, pretrained=None, **kwargs)
    if pretrained is not None:
        state, _ = _read(pretrained, trust_pickle, "cpu")
        full = any(k.startswith("visual.") for k in state) and not all(k.startswith("visual.") for k in state)
        target = model if full else model.visual
        try:
            target.load_state_dict(state if full else image_encoder_state_dict(state), strict=True)
        except RuntimeError as err:
            raise ValueError(f"{str(pretrained)!r} does not fit architecture {name!r}: {err}") from err
    return model.to(device)
