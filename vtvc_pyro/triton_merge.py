"""The fused Triton merge kernel. Imported only when the Triton path is used (CUDA tensors, or CPU tensors
with ``TRITON_INTERPRET=1`` set before the first ``import triton``)."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

CHUNK = 2048  # elements per program; a chunk never crosses a block boundary


@triton.jit
def _merge_kernel(base_ptr, vec_ptr, coef_ptr, out_ptr, chunk_start_ptr, chunk_len_ptr, chunk_block_ptr,
                  num_tasks, num_params, num_blocks, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    start = tl.load(chunk_start_ptr + pid)
    length = tl.load(chunk_len_ptr + pid)
    block = tl.load(chunk_block_ptr + pid)
    lane = tl.arange(0, BLOCK)
    mask = lane < length
    offs = start + lane
    acc = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rows = vec_ptr + offs  # int64 offsets; advanced one row per task, so T·P may exceed 2**31
    for t in range(num_tasks):
        c = tl.load(coef_ptr + t * num_blocks + block)
        acc += c * tl.load(rows, mask=mask, other=0.0).to(tl.float32)
        rows += num_params
    tl.store(out_ptr + offs, acc, mask=mask)


@functools.lru_cache(maxsize=16)
def _chunk_table(segments: tuple[tuple[int, int], ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(start, length, block id) of every chunk of at most CHUNK elements inside one block segment."""
    starts, lengths, blocks = [], [], []
    for b, (s, e) in enumerate(segments):
        for c in range(s, e, CHUNK):
            starts.append(c)
            lengths.append(min(CHUNK, e - c))
            blocks.append(b)
    return tuple(torch.tensor(x, dtype=torch.int64, device=device) for x in (starts, lengths, blocks))


def triton_merge_flat(base: torch.Tensor, vectors: torch.Tensor, coef: torch.Tensor,
                      segments: Sequence[tuple[int, int]], out: torch.Tensor) -> torch.Tensor:
    """Fused ``out = base + Σ_t coef[t, b] · vectors[t]`` over non-overlapping block segments; ``coef`` is
    float32 ``[T, B]``."""
    if not vectors.is_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("the Triton merge needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                           f"imported to run on {vectors.device} tensors; use backend='torch' instead")
    if not vectors.is_contiguous():
        raise ValueError("vectors must be a contiguous [T, P] buffer")
    T, P = vectors.shape
    starts, lengths, blocks = _chunk_table(tuple((int(s), int(e)) for s, e in segments), vectors.device)
    if int(lengths.sum()) < P:  # columns outside every segment keep θ0
        out.copy_(base)
    if starts.numel():
        kernel = _merge_kernel[(starts.numel(),)]
        kernel(base, vectors, coef, out, starts, lengths, blocks, T, P, len(segments), BLOCK=CHUNK)
    return out
