"""Measurements behind the Sizing section of experiments/README.md: for a ViT, the bank's size (T task
vectors, float32 and bf16 storage), and at a small batch the time and peak memory of a VTVC training step
(per-sample coefficients, forward and backward through the composed encoder) and of an aTLAS step (one
coefficient set for the batch), in multiples of a plain forward of the same batch. Memory is what autograd
saves for the backward pass (distinct storages, the bank's own excluded): the part that grows with the
batch.

    .venv/bin/python benchmarks/sizing.py --model ViT-B-32 --batch 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import torch  # noqa: E402

from vtvc_pyro.compose import ComposedEncoder  # noqa: E402
from vtvc_pyro.task_vectors import TaskVectorBank  # noqa: E402


class Perturbed(Mapping):
    """Fine-tuned stand-ins made one at a time on access: θ0 + 0.01·noise."""

    def __init__(self, state: dict[str, torch.Tensor], num_tasks: int) -> None:
        self.state, self.names = state, [f"task{t}" for t in range(num_tasks)]

    def __getitem__(self, task: str) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.names.index(task) + 1)
        return {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                for k, v in self.state.items()}

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds over ``repeats`` calls after a warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def saved_mb(forward: Callable[[], torch.Tensor], exclude: set[int]) -> float:
    """MB of the distinct storages autograd saves during ``forward()``, except those in ``exclude``."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    visual = open_clip.create_model(args.model, pretrained=None).visual.eval()
    bank = TaskVectorBank.from_state_dicts(visual.state_dict(), Perturbed(visual.state_dict(), args.tasks))
    P, T, B = bank.num_params, bank.num_tasks, bank.num_blocks
    encoder = ComposedEncoder(visual, bank)
    images = torch.randn(args.batch, 3, *visual.image_size)
    coef = torch.full((args.batch, T, B), 0.3)

    def plain() -> torch.Tensor:
        with torch.no_grad():
            return visual(images)

    def vtvc() -> torch.Tensor:  # per-sample coefficients [N, T, B]
        return encoder(images, coef.clone().requires_grad_()).pow(2).sum()

    def atlas() -> torch.Tensor:  # one coefficient set [T, B] for the batch
        return encoder(images, coef[0].clone().requires_grad_()).pow(2).sum()

    bank_storages = {t.untyped_storage().data_ptr() for t in (encoder.vectors, encoder.base)}
    rows = {"plain forward": (timed(plain, args.repeats), 0.0),
            "VTVC step": (timed(lambda: vtvc().backward(), args.repeats), saved_mb(vtvc, bank_storages)),
            "aTLAS step": (timed(lambda: atlas().backward(), args.repeats), saved_mb(atlas, bank_storages))}
    print(f"{args.model}: P = {P:,}, T = {T}, B = {B} blocks; bank float32 {T * P * 4 / 2**30:.2f} GiB, "
          f"bf16 {T * P * 2 / 2**30:.2f} GiB (+ θ0 float32 {P * 4 / 2**30:.2f} GiB); batch {args.batch}, "
          f"{torch.get_num_threads()} threads")
    plain_s = rows["plain forward"][0]
    for name, (seconds, mb) in rows.items():
        print(f"  {name:14s} {seconds:8.2f} s  {seconds / plain_s:6.1f} plain forwards  "
              f"saved for backward {mb:7.0f} MB ({mb / args.batch:6.1f} MB per image)")


if __name__ == "__main__":
    main()
