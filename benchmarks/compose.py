"""Benchmark the sample-specific composed forward against the ways it replaces.

For each model and batch size N, with T task vectors (random perturbations of a random-init tower):
  plain      forward of the pre-trained tower on the batch (the unit of cost)
  loop       per sample: ``bank.merge(coef[n])`` then a batch-1 ``functional_call`` (what prototypes do)
  vmap       ``torch.func.vmap`` over ``functional_call`` with per-sample weights (N x P floats; skipped
             when that exceeds --vmap-limit-gb)
  compose    ``ComposedEncoder`` with k̄ active task vectors per block (--modes), in --patterns: ``same``
             (the same k̄ tasks for every sample of the batch, chosen per block) or ``scattered`` (each
             sample keeps its own k̄ tasks per block, chosen independently per sample and block)
  low-rank   the same with a rank-r bank (--ranks; random rank-r factors: the cost depends on shapes only)
With --train, training steps (forward + backward of ``features.square().sum()``) instead:
  plain      the tower's own step with its parameters trainable (the unit of cost)
  atlas      aTLAS: λ [T, B] shared by the batch, expanded to [N, T, B] as ATLASModel hands it over
  vtvc       per-sample coefficients [N, T, B] (scattered pattern, k̄ per block), the derivative wanted at
             every component (straight-through gates), with the full bank and each --ranks bank
Every method runs in its own subprocess (the bank is saved once and read back), under ``torch.no_grad()``
(except training steps); times are medians over --repeats calls after one warm-up call; memory is the peak
resident-set growth during those calls (``torch.cuda.max_memory_allocated`` on CUDA).

    .venv/bin/python benchmarks/compose.py --models tiny --batch-sizes 32 --repeats 3
    .venv/bin/python benchmarks/compose.py --models vit-b-32 --batch-sizes 64 --densities 1 \\
        --patterns same,scattered --modes auto --ranks 16 --no-baselines
    .venv/bin/python benchmarks/compose.py --models vit-b-32 --batch-sizes 16 --train --ranks 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.func import functional_call, vmap  # noqa: E402

from vtvc_pyro import ComposedEncoder, TaskVectorBank  # noqa: E402

TINY = dict(image_size=28, patch_size=4, width=128, layers=4, heads=4, mlp_ratio=4.0, output_dim=64)


def build_tower(model: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if model == "tiny":
        from open_clip.transformer import VisionTransformer

        return VisionTransformer(**TINY).eval()
    import open_clip

    names = {"vit-b-32": "ViT-B-32", "vit-b-16": "ViT-B-16", "vit-l-14": "ViT-L-14"}
    return open_clip.create_model(names[model], pretrained=None).visual.eval()


class Perturbed(Mapping):
    """Fine-tuned stand-ins made one at a time on access: θ0 + 0.01·std(θ0)·noise per tensor."""

    def __init__(self, state: dict[str, torch.Tensor], num_tasks: int) -> None:
        self.state, self.names = state, [f"task{t}" for t in range(num_tasks)]

    def __getitem__(self, task: str) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.names.index(task) + 1)
        return {k: v + 0.01 * (v.std() if v.numel() > 1 else 1.0) * torch.randn(v.shape, generator=gen)
                for k, v in self.state.items()}

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def coefficients(n: int, num_tasks: int, num_blocks: int, k: int, pattern: str = "same") -> torch.Tensor:
    """``[N, T, B]``: in every block exactly ``k`` tasks are non-zero for every sample, the same ``k`` for
    the whole batch (``same``, chosen at random per block) or chosen per sample (``scattered``)."""
    gen = torch.Generator().manual_seed(k)
    if pattern == "scattered":
        keep = torch.rand(n, num_tasks, num_blocks, generator=gen).argsort(dim=1) < k
        return (0.3 + 0.1 * torch.randn(n, num_tasks, num_blocks, generator=gen)) * keep
    coef = torch.zeros(n, num_tasks, num_blocks)
    for b in range(num_blocks):
        tasks = torch.randperm(num_tasks, generator=gen)[:k]
        coef[:, tasks, b] = 0.3 + 0.1 * torch.randn(n, k, generator=gen)
    return coef


def random_low_rank(bank: TaskVectorBank, rank: int) -> TaskVectorBank:
    """``bank`` with every 2-D+ entry replaced by random rank-``rank`` factors (timing depends on shapes only;
    :meth:`TaskVectorBank.low_rank` computes real ones, by SVD)."""
    gen = torch.Generator().manual_seed(rank)
    vectors, factors, T = bank.vectors.clone(), {}, bank.num_tasks
    for e in bank.entries:
        m, n = (e.shape[0], e.numel // e.shape[0]) if len(e.shape) > 1 else (1, 1)
        if len(e.shape) < 2 or rank * (m + n) >= m * n:
            continue
        a, b = 0.01 * torch.randn(T, m, rank, generator=gen), torch.randn(T, rank, n, generator=gen)
        factors[e.name] = (a, b)
        vectors[:, e.offset:e.offset + e.numel] = torch.bmm(a, b).reshape(T, -1).to(vectors.dtype)
    return TaskVectorBank(vectors, bank.base, bank.entries, bank.block_names, bank.task_names,
                          factors=factors, low_rank_spec={"rank": rank, "energy": None})


def per_sample_params(bank: TaskVectorBank, coef: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{name: [N, *shape]}``: every sample's merged weights (N × P floats)."""
    out = {}
    for e in bank.entries:
        tau = bank.vectors[:, e.offset:e.offset + e.numel].float()
        flat = torch.addmm(bank.base[e.offset:e.offset + e.numel].unsqueeze(0), coef[:, :, e.block], tau)
        out[e.name] = flat.view(-1, *e.shape)
    return out


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def worker(spec: dict) -> dict:
    """Run one method in this process; return its times and peak memory growth."""
    device = torch.device(spec["device"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    visual = build_tower(spec["model"]).to(device)
    bank = TaskVectorBank.load(spec["bank"], mmap=False, device=device)
    visual.load_state_dict(bank.pretrained_state_dict())
    if spec.get("rank"):
        bank = random_low_rank(bank, spec["rank"])
    n, method, train = spec["n"], spec["method"], spec.get("train", False)
    h, w = visual.image_size
    images = torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    coef = coefficients(n, bank.num_tasks, bank.num_blocks, spec["k"], spec.get("pattern", "same")).to(device)
    if train:
        run = train_step(visual, bank, images, coef, method, device)
    elif method == "plain":
        def run():
            return visual(images)
    elif method == "loop":
        def run():
            return torch.cat([functional_call(visual, bank.merge(coef[i]), (images[i:i + 1],))
                              for i in range(n)])
    elif method == "vmap":
        def one(params, image):
            return functional_call(visual, params, (image.unsqueeze(0),)).squeeze(0)

        def run():
            return vmap(one)(per_sample_params(bank, coef), images)
    else:
        encoder = ComposedEncoder(visual, bank, mode=spec["mode"]).to(device)

        def run():
            return encoder(images, coef)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times, cpu = [], []
    with torch.set_grad_enabled(train):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = _rss_kb("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS to the current RSS
                f.write("5")
        run()
        for _ in range(spec["repeats"]):
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            sync()
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_kb("VmHWM") * 1024)
    return {"times": times, "cpu": cpu, "peak_mb": (peak - before) / 2**20}


def train_step(visual, bank: TaskVectorBank, images: torch.Tensor, coef: torch.Tensor, method: str,
               device: torch.device):
    """One forward + backward of ``features.square().sum()``: the tower's own (trainable parameters), aTLAS
    (λ [T, B] expanded over the batch) or VTVC (per-sample coefficients, every derivative wanted)."""
    if method == "plain":
        params = [p.requires_grad_(True) for p in visual.parameters()]

        def run():
            visual(images).square().sum().backward()
            for p in params:
                p.grad = None
        return run
    encoder = ComposedEncoder(visual, bank).to(device)
    lam = torch.full((bank.num_tasks, bank.num_blocks), 0.3, device=device, requires_grad=True)
    per_sample = coef.clone().requires_grad_(True)

    def run():
        c = lam.expand(images.shape[0], -1, -1) if method == "atlas" else per_sample
        encoder(images, c).square().sum().backward()
        lam.grad = per_sample.grad = None
    return run


def calibrate(threads: int, width: int = 768, tokens: int = 50, n: int = 16, repeats: int = 5) -> None:
    """Measure the constants of the cost model of ``mode="auto"`` on one ViT-B-sized MLP layer, in
    multiply-adds per weight element: gathering + scattering a sample (``_GATHER_COST``) and forming one
    sample's weights from T = 8 task vectors (``_MATERIALISE_COST``)."""
    if threads:
        torch.set_num_threads(threads)
    fin, fout, T = width, 4 * width, 8
    x, tau = torch.randn(2 * n, tokens, fin), torch.randn(fin, fout)
    rows, y = torch.arange(0, 2 * n, 2), torch.zeros(2 * n, tokens, fout)
    base, taus, c = torch.randn(1, fin * fout), torch.randn(T, fin * fout), torch.randn(1, T)
    out = torch.empty(1, fin * fout)

    def best(fn) -> float:
        fn()
        return min(timed_call(fn) for _ in range(repeats))

    gemm = best(lambda: x[:n].reshape(-1, fin) @ tau)
    gathered = best(lambda: y.index_add_(0, rows, (x.index_select(0, rows).reshape(-1, fin) @ tau)
                                          .view(n, tokens, fout)))
    merge = best(lambda: torch.addmm(base, c, taus, out=out))
    per_mac = gemm / (n * tokens * fin * fout)
    print(f"GEMM {per_mac * 1e12:.1f} ps per multiply-add; _GATHER_COST ≈ "
          f"{(gathered / gemm - 1) / (1 / fin + 1 / fout):.0f}; _MATERIALISE_COST ≈ "
          f"{merge / (fin * fout) / per_mac:.0f} (multiply-adds per weight element)")


def timed_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_worker(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['method']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_model(model: str, args: argparse.Namespace, tmp: Path) -> None:
    visual = build_tower(model)
    t0 = time.perf_counter()
    path = (args.bank_dir or tmp) / f"{model}-T{args.tasks}.safetensors"
    if path.is_file():  # --bank-dir: built by an earlier run
        bank = TaskVectorBank.load(path)
    else:
        state = visual.state_dict()
        bank = TaskVectorBank.from_state_dicts(state, Perturbed(state, args.tasks))
        bank.save(path)
    P, T, B = bank.num_params, bank.num_tasks, bank.num_blocks
    print(f"\n### {model}: P = {P / 1e6:.2f} M parameters, T = {T}, B = {B} blocks (per tensor), "
          f"device {args.device}, {args.threads or torch.get_num_threads()} threads (bank built in "
          f"{time.perf_counter() - t0:.1f} s)")
    for n in args.batch_sizes:
        base = dict(model=model, bank=str(path), n=n, k=T, repeats=args.repeats, device=args.device,
                    threads=args.threads, mode="auto", train=args.train)
        runs = [("plain", "-", "-", base | {"method": "plain"})]
        if args.train:
            runs.append(("atlas", "-", "-", base | {"method": "atlas"}))
            for rank in [None, *args.ranks] if args.full_rank else args.ranks:
                for k in args.densities:
                    label = "vtvc" + (f" (rank {rank})" if rank else "")
                    runs.append((label, "scattered", k, base | {"method": "vtvc", "k": k, "rank": rank,
                                                                 "pattern": "scattered"}))
        elif args.baselines:
            runs.append(("loop", "-", "-", base | {"method": "loop"}))
            if n * P * 4 <= args.vmap_limit_gb * 2**30:
                runs.append(("vmap", "-", "-", base | {"method": "vmap"}))
            else:
                print(f"vmap skipped at N = {n}: per-sample weights need {n * P * 4 / 2**30:.1f} GiB "
                      f"(> --vmap-limit-gb {args.vmap_limit_gb})")
        if not args.train:
            for mode in args.modes:
                for pattern in args.patterns:
                    for k in args.densities:
                        runs.append((f"compose ({mode})", pattern, k,
                                     base | {"method": "compose", "mode": mode, "k": k, "pattern": pattern}))
            for rank in args.ranks:
                for k in args.rank_densities or args.densities:
                    runs.append((f"compose (auto, rank {rank})", "same", k,
                                 base | {"method": "compose", "k": k, "rank": rank}))
        results = {}
        unit = "forward + backward" if args.train else "forward"
        print(f"\nN = {n}, {unit}: medians of {args.repeats} calls; ratios use {args.clock} time; "
              "speed-up = loop time / time; bound = time / ((1 + k̄) · plain)")
        print("| method | pattern | k̄ | wall s (min-max) | CPU s | × plain | bound | vs loop | "
              "peak extra MB |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for label, pattern, k, spec in runs:
            res = run_worker(spec)
            wall, cpu = statistics.median(res["times"]), statistics.median(res["cpu"])
            results[(label, pattern, k)] = t = wall if args.clock == "wall" else cpu
            plain, loop = results.get(("plain", "-", "-"), t), results.get(("loop", "-", "-"))
            bound = f"{t / ((1 + k) * plain):.2f}" if k != "-" else ""
            speedup = f"{loop / t:.1f}×" if loop else ""
            spread = f"{min(res['times']):.2f}-{max(res['times']):.2f}"
            print(f"| {label} | {pattern} | {k} | {wall:.2f} ({spread}) | {cpu:.2f} | {t / plain:.2f} | "
                  f"{bound} | {speedup} | {res['peak_mb']:.0f} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    split = lambda cast: lambda s: [cast(v) for v in s.split(",") if v]  # noqa: E731
    parser.add_argument("--models", type=split(str), default=["tiny", "vit-b-32"],
                        help="comma-separated: tiny, vit-b-32, vit-b-16, vit-l-14")
    parser.add_argument("--batch-sizes", type=split(int), default=[32, 64])
    parser.add_argument("--densities", type=split(int), default=[1, 2, 8], help="k̄ values")
    parser.add_argument("--modes", type=split(str), default=["auto", "composed"])
    parser.add_argument("--patterns", type=split(str), default=["same", "scattered"],
                        help="comma-separated: same, scattered")
    parser.add_argument("--ranks", type=split(int), default=[], help="low-rank banks to time (rank r)")
    parser.add_argument("--rank-densities", type=split(int), default=[],
                        help="k̄ values of the low-rank rows (default: --densities)")
    parser.add_argument("--train", action="store_true", help="time training steps instead of inference")
    parser.add_argument("--no-full-rank", dest="full_rank", action="store_false",
                        help="--train: no full-bank VTVC step (the plain, aTLAS and --ranks steps)")
    parser.add_argument("--calibrate", action="store_true", help="measure the cost model's constants")
    parser.add_argument("--bank-dir", type=Path, help="keep the random banks here and reuse them")
    parser.add_argument("--no-baselines", dest="baselines", action="store_false",
                        help="skip the per-sample loop and vmap rows")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vmap-limit-gb", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch default)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="time used for ratios; cpu (process time) is steadier on a busy machine")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.calibrate:
        calibrate(args.threads)
        return
    if max(args.densities) > args.tasks:
        parser.error(f"--densities must not exceed --tasks ({args.tasks})")
    with tempfile.TemporaryDirectory(prefix="vtvc-bench-") as tmp:
        for model in args.models:
            bench_model(model, args, Path(tmp))


if __name__ == "__main__":
    main()
