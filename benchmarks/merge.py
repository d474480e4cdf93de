"""Merge benchmark: a ViT-B-32-sized bank (T = 8 task vectors), per-block coefficients.

Times, in one run and on the same data, round after round (interleaved), in two groups: the merges into
preallocated memory with their copy reference, then the two that allocate their outputs (so that
first-touching and freeing hundreds of MB does not land between the merge and its copy reference):
  fused      bank.merge(coef), backend "auto": the fused kernel (torch.compile / Inductor on CPU, one pass
             over memory; Triton on CUDA) over the flat [T, P] buffer, into a newly allocated output
  fused-out  the same into a preallocated output (bank.merge(coef, out=buffer)), as the copy below
  bf16-out   fused-out with the task vectors stored in bfloat16 (read as float32; (2T+8)·P bytes moved)
  eager-out  fused-out through eager torch (backend "torch": θ0 copied, then one matrix-vector product per
             block segment; bf16 widened through a buffer), the path without a compiler
  naive      the per-tensor formula θ0[k] + Σ_t coef[t, b(k)] · τ_t[k], one tensor and one task at a time,
             as the task-arithmetic codebases apply task vectors (out-of-place arithmetic on state dicts)
  copy       the bandwidth reference: Tensor.copy_ into a preallocated buffer, moving as many bytes as a
             merge. A merge reads (T+1)·P·4 bytes and writes P·4, (T+2)·P·4 bytes in all; the copy reads
             and writes (T+2)·P·2 bytes each (its source is a slice of the task-vector buffer, not cached).
Speed-up = naive / fused (both allocate their outputs). Share of copy bandwidth = copy / fused-out (both
write into memory that is already mapped; on this CPU VM, first-touching a fresh 350 MB output costs about
as much as the merge itself, so copy / fused is printed too).

Run: .venv/bin/python benchmarks/merge.py [--tasks 8] [--repeats 7] [--device cpu|cuda]
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

from vtvc_pyro import TaskVectorBank  # noqa: E402


class Perturbed(Mapping):
    """θ0 plus small Gaussian noise, generated on access (one fine-tuned copy in memory at a time)."""

    def __init__(self, base: Mapping[str, torch.Tensor], seed: int, scale: float = 1e-3) -> None:
        self.base, self.seed, self.scale = base, seed, scale
        self.index = {k: i for i, k in enumerate(base)}

    def __getitem__(self, key: str) -> torch.Tensor:
        v = self.base[key]
        if not v.is_floating_point():
            return v
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.index[key])
        return v + self.scale * torch.randn(v.shape, generator=gen)

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(methods: dict[str, Callable[[], object]], repeats: int,
                device: torch.device) -> dict[str, list[float]]:
    """Time every method once per round, round after round, so that load from other processes on a shared
    machine hits all of them alike; the first round is a warm-up (allocator, Triton or Inductor
    compilation)."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for round_ in range(repeats + 1):
        for name, fn in methods.items():
            seconds = timed(fn, device)
            if round_:
                times[name].append(seconds)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    theta0 = open_clip.create_model(args.model, pretrained=None).visual.state_dict()
    tasks = {f"task{t}": Perturbed(theta0, seed=t) for t in range(args.tasks)}
    bank = TaskVectorBank.from_state_dicts(theta0, tasks).to(device)
    T, P, B = bank.num_tasks, bank.num_params, bank.num_blocks
    coef = torch.rand(T, B, generator=torch.Generator().manual_seed(1)).to(device)

    bf16 = TaskVectorBank(bank.vectors.to(torch.bfloat16), bank.base, bank.entries, bank.block_names,
                          bank.task_names)
    base = {k: bank.pretrained_tensor(k) for k in bank.param_names}
    taus = [{k: bank.task_vector(k)[t] for k in bank.param_names} for t in range(T)]
    blocks = {k: bank.block_index(k) for k in bank.param_names}
    coef_list = coef.tolist()

    def naive() -> dict:
        return {k: base[k] + sum(coef_list[t][blocks[k]] * taus[t][k] for t in range(T)) for k in base}

    fused_sd = bank.merge(coef)
    naive_sd = naive()
    error = max((fused_sd[k] - naive_sd[k]).abs().max().item() for k in base)
    bf16_sd = bf16.merge(coef)
    bf16_error = max((bf16_sd[k] - naive_sd[k]).abs().max().item() for k in base)
    del fused_sd, naive_sd, bf16_sd

    half = (T + 2) * P // 2
    source = bank.vectors.view(-1)[:half]
    target = torch.empty(half, dtype=torch.float32, device=device)
    out = torch.empty(P, dtype=torch.float32, device=device)

    # the merges into preallocated memory and their copy reference are timed apart from the two that
    # allocate their outputs (first-touching and freeing hundreds of MB per round)
    times = interleaved({"fused-out": lambda: bank.merge(coef, out=out),
                         "bf16-out": lambda: bf16.merge(coef, out=out),
                         "eager-out": lambda: bank.merge(coef, backend="torch", out=out),
                         "copy": lambda: target.copy_(source)}, args.repeats, device)
    allocating = {"fused": lambda: bank.merge(coef), "naive": naive}
    times |= interleaved(allocating, args.repeats, device)
    moved = (T + 2) * P * 4
    print(f"{args.model}: T={T}, P={P:,}, B={B} blocks, {device}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved rounds; max |fused - naive| = {error:.2e}, "
          f"bf16 storage {bf16_error:.2e}")
    print(f"{'':10s}{'time (s)':>10s}{'GB/s':>8s}")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"{name:10s}{median:10.3f}{moved / median / 1e9:8.2f}")

    def ratio(a: str, b: str) -> float:  # median over rounds of time[a] / time[b] (of medians across groups)
        if (a in allocating) != (b in allocating):
            return statistics.median(times[a]) / statistics.median(times[b])
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    print(f"fused vs naive: {ratio('naive', 'fused'):.1f}x faster")
    print(f"share of copy bandwidth: {ratio('copy', 'fused-out'):.0%} "
          f"(with output allocation: {ratio('copy', 'fused'):.0%})")
    print(f"bf16 storage: {ratio('fused-out', 'bf16-out'):.2f}x the float32 merge's speed, in "
          f"{ratio('bf16-out', 'copy'):.0%} of the copy's time")
    print(f"eager torch (no compiler): {ratio('copy', 'eager-out'):.0%} of the copy's bandwidth; the fused "
          f"kernel is {ratio('eager-out', 'fused-out'):.2f}x faster")


if __name__ == "__main__":
    main()
