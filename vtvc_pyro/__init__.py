"""vtvc_pyro: Variational Task Vector Composition in Pyro."""

from __future__ import annotations

import importlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"

_EXPORTS = {
    "TaskVectorBank": "vtvc_pyro.task_vectors",
    "ComposedEncoder": "vtvc_pyro.compose",
    "ClassificationHead": "vtvc_pyro.heads",
    "HeadBank": "vtvc_pyro.heads",
    "MultiTaskDataset": "vtvc_pyro.data",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    """Import on first use, so ``import vtvc_pyro`` stays fast and Triton is loaded only when needed."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vtvc_pyro' has no attribute {name!r}")
