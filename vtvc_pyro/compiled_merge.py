"""The fused merge compiled by ``torch.compile`` (Inductor): one pass over memory on CPU.

Eager torch needs two passes for ``out = θ0 + Σ_t c_t · τ_t`` (copy θ0, then a matrix-vector product that
reads the output back) and widens bf16/fp16 task vectors through a buffer; the compiled kernel reads θ0 and
the T rows once, accumulates in float32 in registers and writes the output once. Measured on the 2-core
CPU (benchmarks/merge.py, benchmarks/README.md): 1.2–1.6× eager torch and 80–86 % of ``Tensor.copy_``'s
bandwidth at ViT-B-32 (152 segments in 52 calls; above the copy on one large segment), and bf16 storage,
half the bytes, 1.5–1.7× faster again. Compiling takes a few seconds once per process (Inductor caches
the generated code on disk), so ``merge_flat(backend="auto")`` uses it only for banks large enough to pay.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import torch

AUTO_MIN_ELEMENTS = 1 << 25  # T·P from which backend="auto" compiles on CPU (merges of ≥ ~50 ms eager)
SMALL_SEGMENT = 1 << 14  # segments shorter than this (biases, LayerNorms) are merged together in one call
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


def _merge_gathered(base: torch.Tensor, vectors: torch.Tensor, coef: torch.Tensor, columns: torch.Tensor,
                    blocks: torch.Tensor) -> torch.Tensor:
    # the small segments' columns in one call: each column's coefficient gathered from its block's
    acc = base[columns]
    for t in range(vectors.shape[0]):
        acc = acc + coef[t][blocks] * vectors[t][columns].to(torch.float32)
    return acc


@functools.cache
def _kernel():
    return torch.compile(_merge_segment, dynamic=True)


@functools.cache
def _gathered_kernel():
    return torch.compile(_merge_gathered, dynamic=True)


@functools.lru_cache(maxsize=8)
def _small_segments(segments: tuple[tuple[int, int], ...], below: int, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The columns of the segments shorter than ``below`` and the index of each one's segment (``None``
    for fewer than two such segments: then a call per segment costs no more)."""
    small = [(b, s, e) for b, (s, e) in enumerate(segments) if 0 < e - s < below]
    if len(small) < 2:
        return None
    columns = torch.cat([torch.arange(s, e) for _, s, e in small])
    blocks = torch.cat([torch.full((e - s,), b) for b, s, e in small])
    return columns.to(device), blocks.to(device)


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
    (columns outside every segment get ``base``); ``coef`` is float32 ``[T, B]``. One kernel call per
    segment of at least ``SMALL_SEGMENT`` columns and one for all the shorter ones together (at ViT-B-32,
    52 calls instead of 152: each call costs about 0.05 ms whatever its size). Raises whatever
    ``torch.compile`` raises where it cannot build the kernel (no C++ compiler, say)."""
    kernel, done = _kernel(), 0
    small = _small_segments(tuple(segments), SMALL_SEGMENT, vectors.device)
    with _recompile_limit():
        for b, (s, e) in sorted(enumerate(segments), key=lambda item: item[1]):
            if s > done:  # a gap no segment covers
                out[done:s].copy_(base[done:s])
            if e - s >= SMALL_SEGMENT or (small is None and e > s):
                kernel(out, base, vectors, coef[:, b], s, e)
            done = max(done, e)
        if done < base.numel():
            out[done:].copy_(base[done:])
        if small is not None:
            columns, blocks = small
            out.index_copy_(0, columns, _gathered_kernel()(base, vectors, coef, columns, blocks))
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
