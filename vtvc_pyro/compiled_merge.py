"""The fused merge compiled by ``torch.compile`` (Inductor): one pass over memory on CPU.

Eager torch needs two passes for ``out = θ0 + Σ_t c_t · τ_t`` (copy θ0, then a matrix-vector product that
reads the output back) and widens bf16/fp16 task vectors through a buffer; the compiled kernel reads θ0 and
the T rows once, accumulates in float32 in registers and writes the output once. Measured on the 2-core
CPU (benchmarks/merge.py, benchmarks/README.md) it moves bytes faster than ``Tensor.copy_``, and bf16
storage, half the bytes, is faster again. Compiling takes a few seconds once per process (Inductor caches
the generated code on disk), so ``merge_flat(backend="auto")`` uses it only for banks large enough to pay.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import torch

AUTO_MIN_ELEMENTS = 1 << 25  # T·P from which backend="auto" compiles on CPU (merges of ≥ ~50 ms eager)
_log = logging.getLogger(__name__)


def _merge_segment(out: torch.Tensor, base: torch.Tensor, vectors: torch.Tensor, coef: torch.Tensor) -> None:
    acc = base
    for t in range(vectors.shape[0]):  # unrolled at compile time: T loads and one store per element
        acc = acc + coef[t] * vectors[t].to(torch.float32)
    out.copy_(acc)


@functools.cache
def _kernel():
    return torch.compile(_merge_segment, dynamic=True, fullgraph=True)


def compiled_merge_flat(base: torch.Tensor, vectors: torch.Tensor, coef: torch.Tensor,
                        segments: Sequence[tuple[int, int]], out: torch.Tensor) -> torch.Tensor:
    """Fused ``out[s:e] = base[s:e] + Σ_t coef[t, b] · vectors[t, s:e]`` per block segment ``b = (s, e)``
    (columns outside every segment get ``base``); ``coef`` is float32 ``[T, B]``. Raises whatever
    ``torch.compile`` raises where it cannot build the kernel (no C++ compiler, say)."""
    kernel = _kernel()
    done = 0
    for b, (s, e) in sorted(enumerate(segments), key=lambda item: item[1]):
        if s > done:  # a gap no segment covers
            out[done:s].copy_(base[done:s])
        if e > s:
            kernel(out[s:e], base[s:e], vectors[:, s:e], coef[:, b])
        done = max(done, e)
    if done < base.numel():
        out[done:].copy_(base[done:])
    return out


def try_compiled_merge_flat(base: torch.Tensor, vectors: torch.Tensor, coef: torch.Tensor,
                            segments: Sequence[tuple[int, int]], out: torch.Tensor) -> bool:
    """:func:`compiled_merge_flat` where it works: ``False`` (and a warning, once per process) where
    ``torch.compile`` fails here, and from then on without trying again."""
    global _failed
    if _failed:
        return False
    try:
        compiled_merge_flat(base, vectors, coef, segments, out)
    except Exception as err:  # noqa: BLE001 (any compiler or toolchain failure means: merge eagerly)
        _failed = True
        _log.warning("torch.compile could not build the fused merge (%s: %s); merging with eager torch",
                     type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return False
    return True


_failed = False
