"""The prepared GPU check's figures (benchmarks/gpu_check.sh), each with the ratio it is judged by:

  merge     θ0 + Σ coef·τ over a ViT bank (T task vectors): fused Triton kernel vs the torch path vs a
            device copy of the same bytes (judged by: Triton's share of copy bandwidth; Triton vs torch)
  compose   the per-sample composed forward at batch N vs the per-sample loop (merge, then a batch-1
            forward) and a plain forward of the tower (judged by: cost in plain forwards; speed-up on the
            loop)
  svi       SVI training steps, images/s, for VTVC (fp32 and bf16) and aTLAS (judged by: step time in plain
            forwards of the same batch)

    python benchmarks/gpu_check.py --device cuda                                   # ViT-B-32, T = 8, N = 128
    python benchmarks/gpu_check.py --device cpu --model tiny --batch 8 --svi-batch 8   # smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import open_clip  # noqa: E402
import torch  # noqa: E402
from merge import timed as time_once  # noqa: E402  (benchmarks/merge.py, beside this script)
from open_clip.transformer import VisionTransformer  # noqa: E402
from torch.func import functional_call  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from vtvc_pyro.baselines import ATLASModel, empty_guide  # noqa: E402
from vtvc_pyro.compose import ComposedEncoder  # noqa: E402
from vtvc_pyro.data import MultiTaskDataset  # noqa: E402
from vtvc_pyro.device import AutocastEncoder, compute_dtype  # noqa: E402
from vtvc_pyro.guide import AmortizedGuide  # noqa: E402
from vtvc_pyro.heads import ClassificationHead, HeadBank  # noqa: E402
from vtvc_pyro.inference import SVIConfig, fit_svi, pretrained_features  # noqa: E402
from vtvc_pyro.merge import merge_flat  # noqa: E402
from vtvc_pyro.model import FrozenNetworks, VTVCModel  # noqa: E402
from vtvc_pyro.task_vectors import TaskVectorBank  # noqa: E402

TINY = dict(image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=2.0, output_dim=32)


def tower(model: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if model == "tiny":
        return VisionTransformer(**TINY).eval()
    return open_clip.create_model(model, pretrained=None).visual.eval()


def bank_for(visual: torch.nn.Module, num_tasks: int, device: torch.device) -> TaskVectorBank:
    """θ0 = the tower's weights; task t = θ0 + 0.01·std·noise (made on the device, one task at a time)."""
    theta0 = {k: v.to(device) for k, v in visual.state_dict().items()}
    gen = torch.Generator(device).manual_seed(1)
    tasks = {f"task{t}": {k: v + 0.01 * (v.float().std() if v.numel() > 1 else 1.0)
                          * torch.randn(v.shape, generator=gen, device=device) if v.is_floating_point() else v
                          for k, v in theta0.items()} for t in range(num_tasks)}
    return TaskVectorBank.from_state_dicts(theta0, tasks)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls after a warm-up (allocator, Triton compilation), synchronised on CUDA."""
    fn()
    return [time_once(fn, device) for _ in range(repeats)]


def med(values: list[float]) -> float:
    return statistics.median(values)


def check_merge(bank: TaskVectorBank, device: torch.device, repeats: int) -> None:
    coef = torch.rand(bank.num_tasks, bank.num_blocks, generator=torch.Generator().manual_seed(2)).to(device)
    out = torch.empty(bank.num_params, device=device)
    moved = (bank.num_tasks + 2) * bank.num_params * 4  # read T + 1 vectors, write one
    half = moved // 8  # float32 elements of a copy that reads and writes moved / 2 bytes each
    source, target = bank.vectors.reshape(-1)[:half], torch.empty(half, device=device)
    args = (bank.base, bank.vectors, coef, bank.segments)
    times = {"torch": timed(lambda: merge_flat(*args, backend="torch", out=out), device, repeats),
             "copy": timed(lambda: target.copy_(source), device, repeats)}
    if device.type == "cuda":
        times["triton"] = timed(lambda: merge_flat(*args, backend="triton", out=out), device, repeats)
        error = (merge_flat(*args, backend="triton") - merge_flat(*args, backend="torch")).abs().max().item()
    print(f"\n## merge: T={bank.num_tasks}, P={bank.num_params:,}, B={bank.num_blocks}, median of {repeats}")
    for name, values in times.items():
        print(f"  {name:7s} {med(values) * 1e3:9.2f} ms  {moved / med(values) / 1e9:8.1f} GB/s")
    if "triton" in times:
        print(f"  Triton share of copy bandwidth: {med(times['copy']) / med(times['triton']):.0%} "
              f"(target >= 80%); Triton vs torch: {med(times['torch']) / med(times['triton']):.2f}x; "
              f"max |triton - torch| = {error:.1e}")
    else:
        print(f"  torch share of copy bandwidth: {med(times['copy']) / med(times['torch']):.0%} "
              "(no Triton off CUDA)")


@torch.no_grad()
def check_compose(visual: torch.nn.Module, bank: TaskVectorBank, images: torch.Tensor,
                  device: torch.device, repeats: int) -> float:
    """Returns the plain forward's median time (the unit of cost)."""
    n = images.shape[0]
    encoder = ComposedEncoder(visual, bank)
    gen = torch.Generator().manual_seed(3)
    coef = (0.3 + 0.1 * torch.randn(n, bank.num_tasks, bank.num_blocks, generator=gen)).to(device)
    names = bank.param_names
    buffer = torch.empty(bank.num_params, device=device)

    def loop() -> torch.Tensor:
        rows = []
        for i in range(n):
            state = bank.merge(coef[i], out=buffer)
            rows.append(functional_call(visual, {k: state[k] for k in names}, (images[i:i + 1],)))
        return torch.cat(rows)

    bf16 = AutocastEncoder(ComposedEncoder(visual, bank, dtype=compute_dtype("bf16")), "bf16", device)
    plain = timed(lambda: visual(images), device, repeats)
    composed = timed(lambda: encoder(images, coef), device, repeats)
    composed_bf16 = timed(lambda: bf16(images, coef), device, repeats)
    per_sample = timed(loop, device, max(1, repeats // 3))
    reference = encoder(images, coef)
    loop_error = (loop() - reference).abs().max().item()
    bf16_error = ((bf16(images, coef) - reference).norm(dim=-1) / reference.norm(dim=-1)).max().item()
    print(f"\n## composed forward: N={n}, T={bank.num_tasks}, all task vectors active, median of {repeats}")
    for name, values in (("plain", plain), ("composed", composed), ("composed bf16", composed_bf16),
                         ("per-sample loop", per_sample)):
        print(f"  {name:16s} {med(values) * 1e3:9.1f} ms  {n / med(values):9.0f} images/s  "
              f"{med(values) / med(plain):6.2f} plain forwards")
    print(f"  composed vs per-sample loop: {med(per_sample) / med(composed):.1f}x faster; composed costs "
          f"{med(composed) / med(plain):.2f} plain forwards (bf16: {med(composed_bf16) / med(plain):.2f}); "
          f"max |loop - composed| = {loop_error:.1e}; bf16 max relative feature error = {bf16_error:.1e}")
    return med(plain)


def check_svi(visual: torch.nn.Module, bank: TaskVectorBank, images: torch.Tensor, device: torch.device,
              steps: int, plain_seconds: float, plain_batch: int) -> None:
    n, dim = images.shape[0], visual.output_dim
    gen = torch.Generator().manual_seed(4)
    names = bank.task_names
    weights = {t: torch.nn.functional.normalize(torch.randn(10, dim, generator=gen), dim=-1) for t in names}
    classes = [str(c) for c in range(10)]
    heads = HeadBank({t: ClassificationHead(w, 100.0, classes) for t, w in weights.items()})
    cpu_images = images.cpu()
    labels = torch.randint(0, 10, (n,), generator=gen)
    data = MultiTaskDataset({t: TensorDataset(cpu_images, labels) for t in names}, names)
    config = SVIConfig(steps=steps, batch_size=n, device=str(device), progress=False)
    print(f"\n## SVI: global batch {n}, {len(data)} data, {steps} steps (the first is not timed)")
    frozen = FrozenNetworks(ComposedEncoder(visual, bank), heads, bank.num_tasks, bank.num_blocks)
    features0 = pretrained_features(frozen, data, batch_size=n, device=device)
    rows = {}
    for method in ("VTVC fp32", "VTVC bf16", "aTLAS fp32"):
        precision = method.split()[1]
        encoder = AutocastEncoder(ComposedEncoder(visual, bank, dtype=compute_dtype(precision)), precision,
                                  device)
        torch.manual_seed(0)
        if method.startswith("VTVC"):
            model = VTVCModel(encoder, heads, None, names, bank.block_names)
            guide = AmortizedGuide(dim, names, bank.block_names)
        else:
            model, guide = ATLASModel(encoder, heads, names, bank.block_names), empty_guide
        stamps: list[float] = []

        def stamp(_info, stamps=stamps) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        fit_svi(model, guide, data, config, features0=features0, callback=stamp)
        seconds = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        rows[method] = seconds
        print(f"  {method:11s} {seconds * 1e3:9.1f} ms/step  {n / seconds:8.0f} images/s  "
              f"{seconds / (plain_seconds * n / plain_batch):6.2f} plain forwards of the batch")
    print(f"  VTVC vs aTLAS step time: {rows['VTVC fp32'] / rows['aTLAS fp32']:.2f}x; bf16 vs fp32 VTVC: "
          f"{rows['VTVC fp32'] / rows['VTVC bf16']:.2f}x faster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--svi-batch", type=int, default=64)
    parser.add_argument("--svi-steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    visual = tower(args.model).to(device)
    bank = bank_for(visual, args.tasks, device)
    size = visual.image_size
    images = torch.randn(args.batch, 3, *size, generator=torch.Generator().manual_seed(5)).to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# gpu_check: {args.model}, T={args.tasks}, {name}, torch {torch.__version__}")
    check_merge(bank, device, args.repeats)
    plain = check_compose(visual, bank, images, device, args.repeats)
    check_svi(visual, bank, images[:args.svi_batch], device, args.svi_steps, plain, args.batch)


if __name__ == "__main__":
    main()
