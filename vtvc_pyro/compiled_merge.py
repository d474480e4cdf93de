"""The fused merge compiled by ``torch.compile`` (Inductor): one pass over memory on CPU.

Eager torch needs two passes for ``out = θ0 + Σ_t c_t · τ_t`` (copy θ0, then a matrix-vector product that
reads the output back) and widens bf16/fp16 task vectors through a buffer; the compiled kernel reads θ0 and
the T rows once, accumulates in float32 in registers and writes the output once. Measured on the 2-core
CPU (benchmarks/merge.py, benchmarks/README.md): 1.2–2.3× eager torch and 77–88 % of ``Tensor.copy_``'s
bandwidth at ViT-B-32 (152 segments; above the copy on one large segment), and bf16 storage, half the
bytes, 1.5–1.7× faster again. Compiling takes a few seconds once per process (Inductor caches
the generated code on disk), so ``merge_flat(backend="auto")`` uses it only for banks large enough to pay.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch

AUTO_MIN_ELEMENTS = 1 << 25  # T·P from which backend="auto" compiles on CPU (merges of ≥ ~50 ms eager)
RECOMPILE_LIMIT = 64
_log = logging.getLogger(__name__)
_failed = False  # set once torch.compile has failed in this process: backend="auto" stops trying


def _merge_segment(out: torch.Tensor, base: torch.Tensor, vectors: torch.Tensor, coef: torch.Tensor,
                   start: int, stop: int) -> None:
    # the whole buffers go in and are sliced inside the graph: handing it views (out[s:e]) makes the
    # compiled wrapper copy the whole storage they view, about 25 ms per call for a ViT-B-32 bank
    acc = base[start:stop]
    for t in range(vectors.shape[0]):  # unrolled at compile time: T loads and one store per element
        acc = acc + coef[t] * vectors[t, start:stop].to(torch.float32)
    out[start:stop].copy_(acc)


@functools.cache
def _kernel():
    return torch.compile(_merge_segment, dynamic=True)


def _recompile_limit() -> Any:
    """Room for one compiled variant per storage dtype, T and shape specialisation in a process (Dynamo's
    default of 8 is reached by a test suite merging float32, bf16 and fp16 banks); past it the function
    runs eagerly, with Dynamo's warning."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: RECOMPILE_LIMIT})


def compiled_merge_flat(base: torch.Tensor, vectors: torch.Tensor, coef: torch.Tensor,
                        segments: Sequence[tuple[int, int]], out: torch.Tensor) -> torch.Tensor:
    """Fused ``out[s:e] = base[s:e] + Σ_t coef[t, b] · vectors[t, s:e]`` per block segment ``b = (s, e)``
    (columns outside every segment get ``base``); ``coef`` is float32 ``[T, B]``. Raises whatever
    ``torch.compile`` raises where it cannot build the kernel (no C++ compiler, say)."""
    kernel = _kernel()
    done = 0
    with _recompile_limit():
        for b, (s, e) in sorted(enumerate(segments), key=lambda item: item[1]):
            if s > done:  # a gap no segment covers
                out[done:s].copy_(base[done:s])
            if e > s:
                kernel(out, base, vectors, coef[:, b], s, e)
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
