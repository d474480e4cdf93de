"""Where and in which precision an experiment computes: ``device: auto | cpu | cuda | cuda:N`` and
``precision: fp32 | bf16 | fp16`` (autocast around the frozen encoder only; the guide, the heads' scores, the
ELBO and the merges' accumulation stay in float32)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` torch threads (``None``: as set), then restore the caller's count."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; a CUDA device that this
    machine lacks raises naming it."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: {spec!r} is not a device; allowed: auto, cpu, cuda, cuda:N") from err
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: {spec!r} is not a device; allowed: auto, cpu, cuda, cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {spec!r} but CUDA is not available on this machine (use cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device: {spec!r} but this machine has {torch.cuda.device_count()} CUDA "
                             "device(s)")
    return device


def compute_dtype(precision: str) -> torch.dtype:
    """The autocast dtype of ``precision`` (``fp32``: no autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: {precision!r} is not a precision; allowed: {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


class AutocastEncoder:
    """``encoder(*inputs)`` (a composed encoder's ``(images, coef)``, a plain tower's ``(images,)``) run under
    ``torch.autocast`` in ``precision`` on ``device``'s type, returning float32 features; ``fp32`` calls the
    encoder unchanged."""

    def __init__(self, encoder: Callable[..., torch.Tensor], precision: str, device: torch.device | str):
        self.encoder, self.precision = encoder, precision
        self.dtype, self.device_type = compute_dtype(precision), torch.device(device).type

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.dtype == torch.float32:
            return self.encoder(*inputs)
        with torch.autocast(self.device_type, dtype=self.dtype):
            features = self.encoder(*inputs)
        return features.float()
