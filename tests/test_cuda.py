"""Device and precision: device selection and the autocast encoder (here), and the CUDA paths, marked
``cuda`` and skipped without a GPU (benchmarks/gpu_check.sh runs them): the compiled Triton merge against the
torch path, the composed forward on CUDA against CPU (float32 and bf16 tolerances), short SVI fits on CUDA
with a checkpoint resumed on the CPU, and DDP with NCCL on two GPUs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch.testing import assert_close
from torch.utils.data import TensorDataset

from vtvc_pyro.baselines import ATLASModel, empty_guide
from vtvc_pyro.compose import ComposedEncoder
from vtvc_pyro.data import MultiTaskDataset
from vtvc_pyro.device import AutocastEncoder, compute_dtype, resolve_device
from vtvc_pyro.guide import AmortizedGuide
from vtvc_pyro.heads import ClassificationHead, HeadBank
from vtvc_pyro.inference import SVIConfig, fit_svi, load_checkpoint
from vtvc_pyro.merge import merge_flat
from vtvc_pyro.model import VTVCModel
from vtvc_pyro.task_vectors import TaskVectorBank

ROOT = Path(__file__).parent.parent
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TASKS = ["t0", "t1", "t2"]


def tiny_tower() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(image_size=16, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2.0,
                             output_dim=16).eval()


def tiny_bank(visual, dtype=torch.float32) -> TaskVectorBank:
    theta0 = visual.state_dict()
    g = torch.Generator().manual_seed(1)
    tasks = {t: {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in theta0.items()} for t in TASKS}
    return TaskVectorBank.from_state_dicts(theta0, tasks, dtype=dtype)


def tiny_problem(n=24):
    """A tiny tower, its bank, three random heads and ``n`` random images per task."""
    visual = tiny_tower()
    bank = tiny_bank(visual)
    g = torch.Generator().manual_seed(2)
    heads = HeadBank({t: ClassificationHead(F.normalize(torch.randn(4, 16, generator=g), dim=-1), 30.0,
                                            list("abcd")) for t in TASKS})
    data = MultiTaskDataset({t: TensorDataset(torch.randn(n, 3, 16, 16, generator=g),
                                              torch.randint(0, 4, (n,), generator=g)) for t in TASKS}, TASKS)
    return visual, bank, heads, data


def test_device_selection():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device: 'tpu' is not a device; allowed: auto, cpu, cuda, cuda:N"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="device: 'cuda:99'"):
        resolve_device("cuda:99")
    with pytest.raises(ValueError, match="precision: 'fp8' is not a precision; allowed: fp32, bf16, fp16"):
        compute_dtype("fp8")


@pytest.mark.parametrize(("precision", "tol"), [("bf16", 3e-2), ("fp16", 5e-3)])
def test_reduced_precision_encoder_returns_float32_features_close_to_float32(precision, tol):
    visual = tiny_tower()
    bank = tiny_bank(visual)
    images = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    coef = torch.rand(5, bank.num_tasks, bank.num_blocks, generator=torch.Generator().manual_seed(4))
    reference = ComposedEncoder(visual, bank)(images, coef)
    coef.requires_grad_()
    encoder = AutocastEncoder(ComposedEncoder(visual, bank, dtype=compute_dtype(precision)), precision, "cpu")
    features = encoder(images, coef)
    assert features.dtype == torch.float32
    error = ((features - reference).norm(dim=-1) / reference.norm(dim=-1)).max()
    assert 0 < error < tol
    features.sum().backward()
    assert coef.grad is not None and torch.isfinite(coef.grad).all()


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
def test_compiled_triton_merge_matches_the_torch_path(storage):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 runs the interpreter, not the compiled kernel (gpu_check.sh sets 0)")
    bank = tiny_bank(tiny_tower(), dtype=storage).to("cuda")
    coef = torch.randn(bank.num_tasks, bank.num_blocks, generator=torch.Generator().manual_seed(5)).cuda()
    triton = merge_flat(bank.base, bank.vectors, coef, bank.segments, backend="triton")
    torch_path = merge_flat(bank.base, bank.vectors, coef, bank.segments, backend="torch")
    naive = bank.base.double().cpu().clone()  # θ0 + Σ_t coef[t, b] τ_t, segment by segment, in float64
    for b, (s, e) in enumerate(bank.segments):
        naive[s:e] += (coef[:, b, None].double().cpu() * bank.vectors[:, s:e].double().cpu()).sum(0)
    assert_close(triton.double().cpu(), naive, atol=1e-5, rtol=1e-5)
    assert_close(triton, torch_path, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@requires_cuda
def test_composed_forward_on_cuda_matches_cpu():
    visual = tiny_tower()
    bank = tiny_bank(visual)
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    coef = torch.rand(6, bank.num_tasks, bank.num_blocks, generator=torch.Generator().manual_seed(7))
    cpu_coef, gpu_coef = coef.clone().requires_grad_(), coef.cuda().requires_grad_()
    cpu = ComposedEncoder(visual, bank)(images, cpu_coef)
    gpu_visual, gpu_bank = tiny_tower().cuda(), bank.to("cuda")
    gpu = ComposedEncoder(gpu_visual, gpu_bank)(images.cuda(), gpu_coef)
    assert gpu.device.type == "cuda"
    assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
    cpu.pow(2).sum().backward()
    gpu.pow(2).sum().backward()
    assert_close(gpu_coef.grad.cpu(), cpu_coef.grad, atol=1e-3, rtol=1e-3)
    bf16 = AutocastEncoder(ComposedEncoder(gpu_visual, gpu_bank, dtype=torch.bfloat16), "bf16", "cuda")
    features = bf16(images.cuda(), coef.cuda())
    assert features.dtype == torch.float32
    assert ((features.cpu() - cpu.detach()).norm(dim=-1) / cpu.detach().norm(dim=-1)).max() < 3e-2


@pytest.mark.cuda
@requires_cuda
def test_short_svi_fits_on_cuda_match_cpu_and_resume_on_cpu(tmp_path):
    visual, bank, heads, data = tiny_problem()
    config = dict(steps=4, batch_size=16, lr=0.05, progress=False)
    losses = {}
    for device in ("cpu", "cuda"):  # aTLAS is deterministic: the same fit on both devices
        encoder = ComposedEncoder(tiny_tower().to(device), bank.to(device))
        torch.manual_seed(0)
        model = ATLASModel(encoder, heads, TASKS, bank.block_names)
        fit = fit_svi(model, empty_guide, data, SVIConfig(**config, device=device, elbo="trace"))
        losses[device] = fit.tempered_elbo
        assert model.coefficients.device.type == device
    assert_close(losses["cuda"], losses["cpu"], atol=1e-4, rtol=1e-4)

    def stop_at_4(info):
        if info.step == 4:
            raise KeyboardInterrupt

    def vtvc(device):
        torch.manual_seed(0)
        encoder = ComposedEncoder(tiny_tower().to(device), bank.to(device))
        model = VTVCModel(encoder, heads, None, TASKS, bank.block_names)
        return model, AmortizedGuide(16, TASKS, bank.block_names, hidden_dim=8)

    path = tmp_path / "vtvc.pt"
    svi = {**config, "steps": 6, "checkpoint_every": 2}
    model, guide = vtvc("cuda")  # started on the GPU, interrupted after step 4 ...
    with pytest.raises(KeyboardInterrupt):
        fit_svi(model, guide, data, SVIConfig(**svi, device="cuda"), checkpoint_path=path, callback=stop_at_4)
    assert load_checkpoint(path)["step"] == 4 and next(guide.parameters()).device.type == "cuda"
    model, guide = vtvc("cpu")  # ... and resumed on the CPU
    fit = fit_svi(model, guide, data, SVIConfig(**svi, device="cpu"), checkpoint_path=path)
    assert fit.start_step == 4 and len(fit.tempered_elbo) == 6
    assert torch.isfinite(torch.tensor(fit.tempered_elbo)).all()
    assert load_checkpoint(path)["step"] == 6


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_nccl_two_gpu_fit_equals_one_gpu_fit(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from ddp_worker import run
    from test_distributed import torchrun

    done = torchrun(tmp_path / "out.pt", tmp_path, device="cuda")
    assert done.returncode == 0, done.stderr[-3000:]
    two = torch.load(tmp_path / "out.pt", weights_only=True)
    single = run(device="cuda")
    for kind in ("vtvc", "atlas"):
        assert two[kind]["rank_spread"] == 0
        assert_close(two[kind]["losses"], single[kind]["losses"], atol=1e-5, rtol=0)
        assert_close(two[kind]["params"], single[kind]["params"], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_gpu_check_script_runs_on_the_cpu_with_a_tiny_tower():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu",
                           "--model", "tiny", "--batch", "4", "--svi-batch", "4", "--svi-steps", "3",
                           "--repeats", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for line in ("## merge", "## composed forward", "composed vs per-sample loop", "VTVC bf16", "aTLAS fp32"):
        assert line in done.stdout


def test_config_keys_name_the_bad_value_and_the_device_does_not_change_the_run(tmp_path):
    from vtvc_pyro.experiment.config import ConfigError, digest, load_config

    config = tmp_path / "c.yaml"
    config.write_text("zoo: {preset: micro}\n")
    with pytest.raises(ConfigError, match="^device: must be auto, cpu, cuda or cuda:N; got 'tpu'"):
        load_config(config, ["--device=tpu"])
    with pytest.raises(ConfigError, match="^precision: "):
        load_config(config, ["--precision=fp8"])
    with pytest.raises(ConfigError, match="^loader.num_workers: "):
        load_config(config, ["--loader.num_workers=-1"])
    base = load_config(config)
    assert (base.device, base.precision, base.bank_dtype) == ("auto", "fp32", "float32")
    assert digest(load_config(config, ["--device=cuda:1", "--loader.num_workers=8"])) == digest(base)
    assert digest(load_config(config, ["--precision=bf16"])) != digest(base)
    assert base.svi_config(device="cuda:0").device == "cuda:0"


SMOKE = ROOT / "experiments" / "configs" / "smoke.yaml"


@pytest.mark.cuda
@requires_cuda
def test_smoke_experiment_on_cuda_matches_cpu_and_runs_in_bf16(micro_zoo, tmp_path):
    import json

    from vtvc_pyro import cli

    runs = {}
    for name, extra in (("cpu", ["--device", "cpu"]), ("cuda", ["--device", "cuda"]),
                        ("bf16", ["--device", "cuda", "--precision=bf16", "--bank_dtype=bfloat16"])):
        cli.main(["run", str(SMOKE), *extra, "--out", str(tmp_path / name)])
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())["methods"]
    assert "computing on cuda" in (tmp_path / "cuda" / "run.log").read_text()
    for method, row in runs["cpu"].items():
        assert runs["cuda"][method]["mean_accuracy"] == pytest.approx(row["mean_accuracy"], abs=0.02), method
        assert runs["cuda"][method]["nll"] == pytest.approx(row["nll"], abs=0.02), method
        assert runs["bf16"][method]["mean_accuracy"] == pytest.approx(row["mean_accuracy"], abs=0.1), method
