"""Reading pickled checkpoints without running code from them.

* The task-arithmetic papers' whole-module files (opt-in, ``--trust-pickle``): an unpickler whose
  ``find_class`` resolves only an allowlist (torch's tensor rebuilders, dtypes and storages; ``torch.nn``,
  open_clip and torchvision-transform classes; a few containers) and maps the papers' ``src.modeling``
  classes and open_clip classes that no longer exist to inert stand-ins. Anything else is refused, named.
* TorchScript archives (OpenAI's ``ViT-B-32.pt``): ``data.pkl`` is read with a restricted unpickler that
  turns every scripted class into a plain record, and the parameter / buffer lists come from parsing (never
  running) the archive's ``code/`` files, so no code from the file runs and no opt-in is needed.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import copyreg
import functools
import importlib
import importlib.util
import pickle
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

_PAPERS_PACKAGES = ("src", "modeling")  # mlfoundations/task_vectors and fredzzhang/atlas: src.modeling.*
# Old open_clip class names -> current ones (open_clip 2.0.2, pinned by mlfoundations/task_vectors, vs now).
_OPEN_CLIP_RENAMES = {"VisualTransformer": "VisionTransformer"}
# open_clip modules whose classes may be rebuilt (not factory / hub / timm / HF modules, which load weights).
_OPEN_CLIP_HOMES = ("open_clip.model", "open_clip.transformer", "open_clip.modified_resnet",
                    "open_clip.transform")
_IMPORTABLE = ("torch.nn.modules", "torchvision.transforms", *_OPEN_CLIP_HOMES)
_BUILTINS = {"set": set, "frozenset": frozenset, "slice": slice, "complex": complex, "bytearray": bytearray,
             "object": object}
_EXTRA_GLOBALS = {
    "collections.OrderedDict": collections.OrderedDict, "collections.defaultdict": collections.defaultdict,
    "collections.Counter": collections.Counter, "collections.deque": collections.deque,
    "copyreg._reconstructor": copyreg._reconstructor, "functools.partial": functools.partial,
    **{f"{home}.{name}": obj for home in ("builtins", "__builtin__") for name, obj in _BUILTINS.items()},
}
_NUMPY_GLOBALS = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
                  "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.ndarray",
                  "numpy.dtype")
_OPEN_CLIP_FUNCTIONS = ("open_clip.transform._convert_to_rgb",)


class RefusedGlobalError(pickle.UnpicklingError):
    """A pickle names a global outside the allowlist (it would run code that reading weights never needs)."""


def _storage_from_bytes(data: bytes) -> Any:
    """What ``torch.storage._load_from_bytes`` does for plain-pickled tensors, with ``weights_only=True``."""
    import io

    return torch.load(io.BytesIO(data), weights_only=True)


def _safe_globals() -> dict[str, Any]:
    from torch._weights_only_unpickler import _get_allowed_globals  # what weights_only=True accepts

    allowed = dict(_get_allowed_globals())
    allowed.update(_EXTRA_GLOBALS)
    allowed["torch.storage._load_from_bytes"] = _storage_from_bytes
    for qualname in _NUMPY_GLOBALS:
        module, _, name = qualname.rpartition(".")
        try:
            allowed[qualname] = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    return allowed


class _LegacyStandIn(torch.nn.Module):
    """Stand-in for a class that no longer resolves: the papers' ``src`` package (``ImageEncoder``,
    ``ClassificationHead``, ...) or an open_clip class that was removed. Unpickling fills its ``__dict__``
    (submodules, parameters, buffers, plain attributes): all that reading weights needs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} is a stand-in for reading legacy weights only")


_STAND_INS: dict[str, type] = {}


def _stand_in(module: str, name: str, base: type = _LegacyStandIn) -> type:
    key = f"{module}.{name}"
    if key not in _STAND_INS:
        attrs = {"__qualname__": name, "__doc__": f"Stand-in for {key}.", "__module__": module}
        _STAND_INS[key] = type(name, (base,), attrs)
    return _STAND_INS[key]


def _allowed_class(obj: Any, package: str) -> bool:
    if not isinstance(obj, type) or obj.__module__.split(".")[0] != package:
        return False
    if package == "torchvision":
        return obj.__module__.startswith("torchvision.transforms")
    if package == "torch":
        return issubclass(obj, torch.nn.Module) and obj.__module__.startswith("torch.nn.modules")
    if obj.__module__ == "open_clip.transform":  # preprocessing classes, modules or not
        return True
    return issubclass(obj, torch.nn.Module) and obj.__module__ in _OPEN_CLIP_HOMES


def _importable(module: str) -> bool:
    """Modules whose classes may be looked up (imported) at all; nothing else is imported."""
    return any(module == p or module.startswith(f"{p}.") for p in _IMPORTABLE)


def _module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _attribute(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


class AllowlistUnpickler(pickle.Unpickler):
    """Unpickler for the papers' pickled modules: resolves only allowlisted globals (see module docstring)."""

    _allowed: dict[str, Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if AllowlistUnpickler._allowed is None:
            AllowlistUnpickler._allowed = _safe_globals()
        qualname = f"{module}.{name}"
        if qualname in self._allowed:
            return self._allowed[qualname]
        package = module.split(".")[0]
        if package in _PAPERS_PACKAGES:
            return _stand_in(module, name)
        if "." not in name and package in ("torch", "torchvision", "open_clip"):
            if qualname in _OPEN_CLIP_FUNCTIONS:
                return _attribute(module, name)
            if package == "open_clip":
                name = _OPEN_CLIP_RENAMES.get(name, name)
                homes = [module] + [h for h in _OPEN_CLIP_HOMES if h != module]
            else:
                homes = [module]
            homes = [h for h in homes if _importable(h)]
            for home in homes:
                obj = _attribute(home, name)
                if obj is not None and _allowed_class(obj, package):
                    return obj
            removed = module in homes or not _module_exists(module)
            if package == "open_clip" and removed and all(_attribute(h, name) is None for h in homes):
                return _stand_in(module, name)  # a class (or module) open_clip has since removed
        raise RefusedGlobalError(
            f"refused global {qualname!r}: reading weights needs only torch, numpy, collections, open_clip / "
            "torchvision-transform classes and the papers' src.modeling classes"
        )


LEGACY_PICKLE_MODULE = SimpleNamespace(
    __name__="vtvc_pyro_allowlist_pickle",
    Unpickler=AllowlistUnpickler,
    load=lambda f, **kwargs: AllowlistUnpickler(f, **kwargs).load(),
)


def quick_gelu_of(module: torch.nn.Module) -> bool | None:
    """True if the module uses QuickGELU, False if it uses GELU, None if it has neither."""
    kinds = {type(m).__name__ for m in module.modules()}
    if "QuickGELU" in kinds:
        return True
    return False if "GELU" in kinds else None


# ---------------------------------------------------------------------------- TorchScript archives


def is_torchscript(path: str | Path) -> bool:
    """True if ``path`` is a TorchScript archive (a zip with ``constants.pkl`` and ``code/``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


class _ScriptObject:
    """A scripted class instance read from ``data.pkl``: its class name and attribute dict, nothing else."""

    qualname = ""
    state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {}


_SCRIPT_CLASSES: dict[str, type] = {}


def _script_class(qualname: str) -> type:
    if qualname not in _SCRIPT_CLASSES:
        name = qualname.rsplit(".", 1)[-1]
        _SCRIPT_CLASSES[qualname] = type(name, (_ScriptObject,), {"qualname": qualname})
    return _SCRIPT_CLASSES[qualname]


def _passthrough(value: Any, *_: Any) -> Any:
    return value


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    return torch.as_strided(storage, size, stride, offset)


# torch.jit._pickle helpers that only tag or wrap a value already in the stream.
_SCRIPT_PASSTHROUGH = ("restore_type_tag", "build_intlist", "build_doublelist", "build_boollist",
                       "build_tensorlist")


class _ScriptUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        import io

        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module: str, name: str) -> Any:
        if module.split(".")[0] == "__torch__":
            return _script_class(f"{module}.{name}")
        if module == "torch.jit._pickle" and name in _SCRIPT_PASSTHROUGH:
            return _passthrough
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage"):
            with contextlib.suppress(KeyError):
                return torch.serialization.StorageType(name)
        raise RefusedGlobalError(f"refused global {module}.{name!r} in a TorchScript archive's data.pkl")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        kind, storage_type, key, _location, numel = pid
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        dtype = storage_type.dtype
        raw = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
        flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        if flat.numel() != numel:
            raise pickle.UnpicklingError(f"storage {key}: {flat.numel()} elements, expected {numel}")
        return flat


def _script_classes(archive: zipfile.ZipFile, prefix: str) -> dict[str, tuple[list[str], list[str]]]:
    """``{"__torch__.pkg.Class": (parameter names, buffer names)}`` parsed (not run) from ``code/``."""
    found: dict[str, tuple[list[str], list[str]]] = {}
    code = f"{prefix}/code/"
    for name in archive.namelist():
        if not (name.startswith(code) and name.endswith(".py")):
            continue
        module = name[len(code):-len(".py")].replace("/", ".")
        for node in ast.parse(archive.read(name).decode("utf-8")).body:
            if not isinstance(node, ast.ClassDef):
                continue
            lists = {"__parameters__": [], "__buffers__": []}
            for stmt in node.body:
                if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                        and isinstance(stmt.targets[0], ast.Name) and stmt.targets[0].id in lists):
                    lists[stmt.targets[0].id] = list(ast.literal_eval(stmt.value))
            found[f"{module}.{node.name}"] = (lists["__parameters__"], lists["__buffers__"])
    return found


def read_torchscript(path: str | Path) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The state dict (parameters and buffers, as ``module.state_dict()`` of the scripted model) of a
    TorchScript archive, and the class names it uses, without running any code from the archive."""
    with zipfile.ZipFile(path) as archive:
        data_pkl = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(data_pkl) != 1:
            raise ValueError(f"{str(path)!r}: a TorchScript archive has one <name>/data.pkl, not {data_pkl}")
        prefix = data_pkl[0].split("/")[0]
        classes = _script_classes(archive, prefix)
        root = _ScriptUnpickler(archive.read(data_pkl[0]), archive, prefix).load()
    if not isinstance(root, _ScriptObject):
        raise ValueError(f"{str(path)!r}: the TorchScript archive does not hold a scripted module")
    state: dict[str, torch.Tensor] = {}
    seen: set[str] = set()

    def walk(obj: _ScriptObject, prefix: str) -> None:
        seen.add(obj.qualname.rsplit(".", 1)[-1])
        if obj.qualname not in classes:
            raise ValueError(f"{str(path)!r}: class {obj.qualname} (at {prefix or 'the root'}) is not "
                             "defined under code/, so its parameters cannot be told from other attributes")
        params, buffers = classes[obj.qualname]
        for key, value in obj.state.items():
            if isinstance(value, torch.Tensor) and key in params + buffers:
                state[prefix + key] = value.clone()
            elif isinstance(value, _ScriptObject):
                walk(value, f"{prefix}{key}.")

    walk(root, "")
    return state, seen
