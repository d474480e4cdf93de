"""Data-parallel SVI across processes started by ``torchrun`` (gloo on CPUs, NCCL on GPUs).

Every rank runs the cheap Pyro parts (guide, KL, ELBO, optimizer) on the whole global mini-batch with the
same RNG stream, so all ranks draw the same samples and hold identical parameters; only the expensive part,
the composed encoder, is split: each rank loads and encodes its rows of the batch, and the features are
gathered. In the backward pass each rank sees the likelihood gradient of its own rows only (scaled by the
world size) plus the shared rest, so the mean of the ranks' gradients is the full-batch gradient, whatever
the guide, ELBO or baseline. The result equals a one-process fit with the same global batch up to float
rounding of the encoder's GEMMs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from vtvc_pyro.data import shard_range
from vtvc_pyro.model import Batch


def init_from_env(device: torch.device | str = "cpu") -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment) with NCCL for a
    CUDA ``device``, else gloo; a no-op in a single process or when already joined. Returns whether the
    process is one of several."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"WORLD_SIZE is set but {missing} are not: start the processes with torchrun")
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return world_size() > 1


def active() -> bool:
    """Whether this process is one rank of several."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes files."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group once every rank got here (a no-op in a single process). A rank that exits
    while others still talk to it, or with the group's threads alive, can abort ("terminate called without
    an active exception", seen about once in six two-process test runs on the loaded 2-core machine)."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself in a single process): decisions that change which
    collectives run, such as resuming from a checkpoint, are taken once."""
    if not active():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0, device=_comm_device(torch.empty(0)))
    return box[0]


def _comm_device(tensor: torch.Tensor) -> torch.device:
    """NCCL moves CUDA tensors only; gloo CPU tensors only."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather(tensor: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """All ranks' ``tensor`` (row counts may differ) concatenated in rank order, and the row counts."""
    device = _comm_device(tensor)
    local = tensor.detach().to(device).contiguous()
    count = torch.tensor([local.shape[0]], device=device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = local.new_zeros((max(sizes), *local.shape[1:]))
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]).to(tensor.device), sizes


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' rows of ``tensor`` concatenated in rank order (``tensor`` itself in a single process);
    no gradient."""
    return _gather(tensor)[0] if active() else tensor


def local_rows(n: int) -> range:
    """This rank's contiguous share of ``n`` rows; all of them in a single process or when ``n`` is smaller
    than the world size."""
    if not active() or n < world_size():
        return range(n)
    return range(*shard_range(n, rank(), world_size()))


def join_rows(tensor: torch.Tensor, n: int) -> torch.Tensor:
    """The whole ``[n, ...]`` from each rank's ``tensor`` of its :func:`local_rows` ``(n)``."""
    return gather_rows(tensor) if active() and n >= world_size() else tensor


class _GatherWithGrad(torch.autograd.Function):
    """Gather rows; the backward keeps this rank's rows of the (identical on every rank) output gradient,
    times the world size (see the module docstring)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        full, sizes = _gather(tensor)
        ctx.lo = sum(sizes[:rank()])
        ctx.hi = ctx.lo + sizes[rank()]
        return full

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad[ctx.lo:ctx.hi] * world_size()


class ShardedEncoder:
    """Wraps ``encoder(images, coef) -> features`` for a fit split across ranks: ``images`` are this rank's
    rows of the global batch, per-sample ``coef`` ``[N, T, B]`` covers the whole batch; returns the
    ``[N, D]`` features of the whole batch."""

    def __init__(self, encoder: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.encoder = encoder

    def __call__(self, images: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        if coef.dim() == 3:
            lo, hi = shard_range(coef.shape[0], rank(), world_size())
            if images.shape[0] != hi - lo:
                raise ValueError(f"rank {rank()} holds {images.shape[0]} images of a batch of {coef.shape[0]}"
                                 f"; its shard is rows [{lo}, {hi})")
            coef = coef[lo:hi]
        return _GatherWithGrad.apply(self.encoder(images, coef))


@contextlib.contextmanager
def split_encoder(model: object) -> Iterator[None]:
    """Within the block, ``model.frozen.encoder`` is a :class:`ShardedEncoder` (nothing changes in a single
    process)."""
    if not active():
        yield
        return
    frozen = getattr(model, "frozen", None)
    if frozen is None:
        raise ValueError("a distributed fit needs model.frozen (the encoder it splits across ranks)")
    encoder = frozen.encoder
    frozen.encoder = ShardedEncoder(encoder)
    try:
        yield
    finally:
        frozen.encoder = encoder


@dataclass
class ShardedBatch(Batch):
    """A global mini-batch of which this rank holds the images of its rows only (``shard_range``); index,
    features, labels and task ids cover the whole batch."""

    def __post_init__(self) -> None:
        n = self.index.shape[0]
        lo, hi = shard_range(n, rank(), world_size())
        if self.images.shape[0] != hi - lo:
            raise ValueError(f"ShardedBatch.images has {self.images.shape[0]} rows; rank {rank()}'s shard of "
                             f"{n} is rows [{lo}, {hi})")
        rows = self.images[:1].expand(n, *self.images.shape[1:])  # a stand-in for the images:
        Batch(self.index, rows, self.features0, self.labels, self.task, self.num_data)  # Batch's checks


def broadcast_params(params: Iterable[torch.Tensor]) -> None:
    """Copy rank 0's parameter values to every rank (so that the ranks start identical whatever random
    numbers each drew before the fit)."""
    if not active():
        return
    with torch.no_grad():
        for p in params:
            buffer = p.detach().to(_comm_device(p)).contiguous()
            dist.broadcast(buffer, src=0)
            p.copy_(buffer)


def all_reduce_grads(params: Iterable[torch.Tensor]) -> None:
    """Replace each parameter's gradient by its mean over the ranks (one flat all-reduce)."""
    if not active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]).to(_comm_device(grads[0]))
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
