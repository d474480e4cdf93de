"""Merging task vectors into weights: the flat merge kernel (torch and Triton paths) and the classic merges
(task arithmetic, TIES-merging) over a :class:`~vtvc_pyro.task_vectors.TaskVectorBank`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from vtvc_pyro.compiled_merge import AUTO_MIN_ELEMENTS, compiled_merge_flat, try_compiled_merge_flat

if TYPE_CHECKING:
    from vtvc_pyro.task_vectors import TaskVectorBank

BACKENDS = ("auto", "torch", "triton", "compiled")
_CHUNK = 1 << 20  # columns converted to float32 at a time by TIES-merging
_WIDEN_CHUNK = 1 << 20  # columns widened to float32 at a time by a bf16/fp16 merge


def check_coef(coef: torch.Tensor | Sequence[float], num_tasks: int, num_blocks: int,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Validate merge coefficients (``[T]`` or ``[T, B]``, finite) and return them as detached float32."""
    coef = torch.as_tensor(coef).detach()
    if coef.shape not in ((num_tasks,), (num_tasks, num_blocks)):
        raise ValueError(f"coef must have shape [T] = [{num_tasks}] or [T, B] = [{num_tasks}, {num_blocks}], "
                         f"got {list(coef.shape)}")
    if not (coef.is_floating_point() or coef.dtype in (torch.int32, torch.int64, torch.bool)):
        raise ValueError(f"coef must be real numbers, got dtype {coef.dtype}")
    coef = coef.to(device=device, dtype=torch.float32)
    bad = ~torch.isfinite(coef)
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"coef{list(index)} = {coef[index].item()} is not finite")
    return coef


def merge_flat(
    base: torch.Tensor,
    vectors: torch.Tensor,
    coef: torch.Tensor,
    segments: Sequence[tuple[int, int]],
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[s:e] = base[s:e] + Σ_t coef[t, b] · vectors[t, s:e]`` for every block segment ``b = (s, e)``.

    ``base`` ``[P]`` float32, ``vectors`` ``[T, P]`` (float32/bf16/fp16, accumulated in float32), ``coef``
    ``[T]`` (same for all blocks) or ``[T, B]``; segments must not overlap. Columns outside every segment
    get ``base``. Writes into ``out`` (a float32 ``[P]`` buffer, reused across merges: allocating fresh
    memory costs about as much as the merge itself on CPU) or a new tensor, and returns it.
    ``backend``: ``"triton"`` the fused Triton kernel (CUDA), ``"compiled"`` the fused kernel built by
    ``torch.compile`` (one pass over memory; a few seconds to compile once per process), ``"torch"`` eager
    torch; ``"auto"`` Triton on CUDA, elsewhere the compiled kernel for banks of at least
    ``compiled_merge.AUTO_MIN_ELEMENTS`` task-vector elements (eager torch for smaller ones, or where
    ``torch.compile`` fails: a warning says so once).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    T, P = vectors.shape
    if base.shape != (P,) or base.dtype != torch.float32:
        raise ValueError(f"base must be float32 [P] = [{P}], got {base.dtype} {list(base.shape)}")
    coef = check_coef(coef, T, len(segments), device=vectors.device)
    if out is None:
        out = torch.empty_like(base)
    elif (out.shape, out.dtype, out.device) != ((P,), torch.float32, base.device) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 [P] = [{P}] tensor on {base.device}, got "
                         f"{out.dtype} {list(out.shape)} on {out.device}")
    elif out.untyped_storage().data_ptr() in (base.untyped_storage().data_ptr(),
                                               vectors.untyped_storage().data_ptr()):
        raise ValueError("out must not share memory with base or vectors")
    if backend == "triton" or (backend == "auto" and vectors.is_cuda and _triton_available()):
        from vtvc_pyro.triton_merge import triton_merge_flat

        if coef.dim() == 1:
            coef = coef[:, None].expand(T, len(segments))
        return triton_merge_flat(base, vectors, coef.contiguous(), segments, out)
    if backend == "compiled" or (backend == "auto" and vectors.numel() >= AUTO_MIN_ELEMENTS):
        if coef.dim() == 1:  # one coefficient per task: one kernel call per run of adjacent segments
            segments = _runs(segments)
            coef = coef[:, None].expand(T, len(segments))
        if backend == "compiled":
            return compiled_merge_flat(base, vectors, coef, segments, out)
        if try_compiled_merge_flat(base, vectors, coef, segments, out):
            return out
    return _torch_merge_flat(base, vectors, coef, segments, out)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _runs(segments: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The segments' runs of adjacent columns, sorted."""
    runs: list[list[int]] = []
    for start, stop in sorted(segments):
        if runs and runs[-1][1] == start:
            runs[-1][1] = stop
        else:
            runs.append([start, stop])
    return [(s, e) for s, e in runs]


def _torch_merge_flat(base: torch.Tensor, vectors: torch.Tensor, coef: torch.Tensor,
                      segments: Sequence[tuple[int, int]], out: torch.Tensor) -> torch.Tensor:
    # θ0 copied in one call, then one matrix-vector product per block segment (per run of adjacent segments
    # for [T] coefficients) added in place: no Python loop over tasks or tensors, few large calls (many small
    # ones, or alternating copies and products, measured 2-4x slower on the shared 2-core CPU). bf16/fp16
    # storage is widened to float32 a chunk at a time into one reused buffer.
    out.copy_(base)
    if coef.dim() == 1:
        segments = _runs(segments)
        coef = coef[:, None].expand(-1, len(segments))
    wide = vectors.dtype == torch.float32
    buffer = None if wide else torch.empty(vectors.shape[0], _WIDEN_CHUNK, device=vectors.device)
    for b, (start, stop) in enumerate(segments):
        step = stop - start if wide else _WIDEN_CHUNK
        for s in range(start, stop, step):
            e = min(s + step, stop)
            rows = vectors[:, s:e] if wide else buffer[:, :e - s].copy_(vectors[:, s:e])
            out[s:e].addmv_(rows.t(), coef[:, b])
    return out


# ---------------------------------------------------------------------------- classic merges


def task_arithmetic(bank: TaskVectorBank, alpha: float) -> dict[str, torch.Tensor]:
    """Task arithmetic (Ilharco et al.): θ0 + α Σ_t τ_t, as a full state dict."""
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    return bank.merge(torch.full((bank.num_tasks,), float(alpha)))


def ties_merging(bank: TaskVectorBank, top_k: float = 0.2, alpha: float = 1.0) -> dict[str, torch.Tensor]:
    """TIES-merging (Yadav et al.): trim, elect sign, disjoint mean; returns θ0 + α · merged.

    Trim keeps, per task, the ``⌊top_k · P⌋`` largest magnitudes of the whole flattened task vector (ties
    at the threshold are kept too; the reference and FusionBench code keep one entry more, which does not
    matter at real sizes). The elected sign of an entry is the sign of the summed trimmed values (zero sums
    take the sign of the sum of all elected signs); the merged entry is the mean of the trimmed values
    that agree with it (zero where none does).
    """
    if not 0.0 < top_k <= 1.0:
        raise ValueError(f"top_k is the share of entries kept and must be in (0, 1], got {top_k}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    vectors, P = bank.vectors, bank.num_params
    keep = int(P * top_k)
    thresholds = torch.full((bank.num_tasks, 1), math.inf, device=bank.device)
    if keep > 0:
        for t in range(bank.num_tasks):
            thresholds[t] = vectors[t].abs().to(torch.float32).kthvalue(P - keep + 1).values
    step = max(1, _CHUNK * 4 // bank.num_tasks)
    trimmed_chunks = [(s, min(s + step, P)) for s in range(0, P, step)]

    def trimmed(s: int, e: int) -> torch.Tensor:
        chunk = vectors[:, s:e].to(torch.float32)
        return chunk * (chunk.abs() >= thresholds)

    sign = torch.empty(P, device=bank.device)
    for s, e in trimmed_chunks:
        sign[s:e] = trimmed(s, e).sum(dim=0).sign()
    sign[sign == 0] = sign.sum().sign()
    merged = bank.base.clone()
    for s, e in trimmed_chunks:
        chunk = trimmed(s, e)
        agree = torch.where(sign[s:e] > 0, chunk > 0, chunk < 0)
        total = (chunk * agree).sum(dim=0)
        merged[s:e] += alpha * total / agree.sum(dim=0).clamp(min=1)
    return bank.state_dict_from_flat(merged)

