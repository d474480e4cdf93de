"""The documented real-user path, end to end (slow; ``make real-smoke``): random-init ViT-B-32 weights in
the formats users have (the papers' pickled ``ImageEncoder`` files, a full CLIP state dict), tiny datasets in
the eight layouts of ``standard_tasks``, then experiments/README.md followed literally — ``vtvc convert
--trust-pickle`` for every encoder, ``vtvc run experiments/configs/vit_b32_task_addition.yaml`` with small
overrides and ``--device cpu`` — and every method must report every task."""

import json
from pathlib import Path

import pytest
import torchvision
from real_user import write_user_files

from vtvc_pyro import cli
from vtvc_pyro.standard_tasks import STANDARD_TASKS

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "vit_b32_task_addition.yaml"
SMALL = ["--protocol.max_fit_per_task=2", "--protocol.max_test_per_task=2",
         "--protocol.alpha_grid=[0.0, 0.5]", "--svi.steps=1", "--svi.batch_size=4", "--baselines.steps=1",
         "--baselines.batch_size=4", "--eval.batch_size=16", "--eval.posterior_draws=2",
         "--eval.posterior_per_task=1"]


@pytest.mark.slow
def test_readme_path_with_papers_checkpoints_reports_every_method_on_every_task(tmp_path, monkeypatch):
    write_user_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    # torchvision checks SVHN's files against the official MD5 sums, which made-up files cannot match
    monkeypatch.setattr(torchvision.datasets.SVHN, "_check_integrity", lambda self: True)
    folder = Path("checkpoints/ViT-B-32")
    cli.main(["convert", "--trust-pickle", str(folder / "zeroshot.pt"), str(folder / "zeroshot.safetensors")])
    for task in STANDARD_TASKS:
        cli.main(["convert", "--trust-pickle", str(folder / task / "finetuned.pt"),
                  str(folder / task / "finetuned.safetensors")])
    cli.main(["run", str(CONFIG), *SMALL, "--device", "cpu", "--out", "runs/vit_b32"])
    metrics = json.loads(Path("runs/vit_b32/metrics.json").read_text())
    assert metrics["tasks"] == list(STANDARD_TASKS)
    assert list(metrics["methods"]) == ["zeroshot", "finetuned", "task_arithmetic", "ties", "atlas",
                                        "metanet", "vtvc_gaussian", "vtvc_stochastic", "vtvc", "vtvc_merged"]
    for method in metrics["methods"]:
        result = json.loads(Path(f"runs/vit_b32/methods/{method}.json").read_text())
        assert sorted(result["tasks"]) == sorted(STANDARD_TASKS), method
        assert all(0 <= m["accuracy"] <= 1 and m["n"] > 0 for m in result["tasks"].values()), method
