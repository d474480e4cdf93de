"""Data-parallel SVI with gloo and two processes under torchrun: the 2-process fit equals the 1-process fit
with the same global batch, a 2-process run killed mid-fit resumes to the same result, and pre-trained
features and evaluation are sharded and gathered to the single-process values."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_worker import run
from torch.testing import assert_close

WORKER = Path(__file__).parent / "ddp_worker.py"
ROOT = Path(__file__).parent.parent


def torchrun(out: Path, checkpoints: Path, kill_at: int = 0, device: str = "cpu"):
    """tests/ddp_worker.py in two processes (gloo on CPU, NCCL on CUDA)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(WORKER), str(out), str(checkpoints), str(kill_at), device]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def single():
    return run()


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    done = torchrun(tmp / "out.pt", tmp)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp / "out.pt", weights_only=True)


def test_two_process_fit_equals_one_process_fit_with_the_same_global_batch(single, two):
    assert two["world_size"] == 2
    for kind in ("vtvc", "atlas"):
        assert two[kind]["rank_spread"] == 0  # identical parameters on both ranks
        assert_close(two[kind]["losses"], single[kind]["losses"], atol=1e-5, rtol=0)
        assert_close(two[kind]["params"], single[kind]["params"], atol=1e-5, rtol=0)
    assert single["vtvc"]["losses"][0] != single["vtvc"]["losses"][-1]  # the fit moved


def test_features_and_evaluation_are_sharded_and_gathered(single, two):
    assert_close(two["features0"], single["features0"], atol=1e-6, rtol=0)
    assert_close(two["metrics"], single["metrics"], atol=1e-6, rtol=0)


def test_killed_two_process_run_resumes_to_the_same_result(two, tmp_path):
    killed = torchrun(tmp_path / "killed.pt", tmp_path, kill_at=5)
    assert killed.returncode != 0 and not (tmp_path / "killed.pt").exists()
    saved = torch.load(tmp_path / "vtvc.pt", weights_only=True)
    assert saved["step"] == 4  # the last checkpoint before the kill
    resumed = torchrun(tmp_path / "resumed.pt", tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = torch.load(tmp_path / "resumed.pt", weights_only=True)
    for kind in ("vtvc", "atlas"):
        assert torch.equal(result[kind]["losses"], two[kind]["losses"])
        assert_close(result[kind]["params"], two[kind]["params"], atol=0, rtol=0)


SMOKE = ROOT / "experiments" / "configs" / "smoke.yaml"


@pytest.mark.slow
def test_torchrun_experiment_equals_the_single_process_run(micro_zoo, tmp_path):
    """``torchrun --nproc_per_node=2 -m vtvc_pyro run smoke.yaml`` on the micro zoo: every method reports
    the single-process numbers (fits up to the encoder's float rounding), rank 0 alone wrote the run."""
    import json

    from vtvc_pyro import cli

    cli.main(["run", str(SMOKE), "--out", str(tmp_path / "one"), "--device", "cpu"])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "vtvc_pyro", "run", str(SMOKE), "--out", str(tmp_path / "two"), "--device", "cpu"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / r / "metrics.json").read_text())["methods"] for r in ("one", "two"))
    assert one.keys() == two.keys()
    for method, row in one.items():
        for key, value in row.items():
            if isinstance(value, float) and not key.endswith("seconds"):
                assert two[method][key] == pytest.approx(value, abs=1e-4), (method, key)
    log = (tmp_path / "two" / "run.log").read_text()
    assert "2 processes" in log and log.count("computing on cpu") == 1  # one writer
    assert not list((tmp_path / "two").rglob("*.tmp*"))
