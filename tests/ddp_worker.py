"""Fits of the planted problem (VTVC and aTLAS), its pre-trained features and its evaluation, run as one
process or under ``torchrun`` (tests/test_distributed.py); rank 0 saves what every rank computed.

    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py OUT CHECKPOINT_DIR [KILL_AT_STEP [DEVICE]]
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).parent))
from planted import planted_problem  # noqa: E402

from vtvc_pyro import distributed  # noqa: E402
from vtvc_pyro.baselines import ATLASModel, empty_guide  # noqa: E402
from vtvc_pyro.evaluate import evaluate_encoder  # noqa: E402
from vtvc_pyro.guide import AmortizedGuide  # noqa: E402
from vtvc_pyro.inference import SVIConfig, fit_svi, pretrained_features  # noqa: E402
from vtvc_pyro.model import VTVCModel  # noqa: E402

CONFIG = {"steps": 10, "batch_size": 16, "lr": 0.02, "checkpoint_every": 2, "progress": False}


def run(checkpoint_dir: Path | None = None, kill_at: int = 0, device: str = "cpu") -> dict:
    """Both fits, the features and the metrics of the planted problem (60 data: the last batch of an
    epoch has 12) on ``device``."""
    problem = planted_problem(num_per_task=20)
    encoder = problem.encoder
    encoder.base, encoder.deltas = encoder.base.to(device), encoder.deltas.to(device)
    features0 = pretrained_features(
        VTVCModel(problem.encoder, problem.heads, None, problem.task_names, problem.block_names).frozen,
        problem.data, batch_size=7, device=device)
    out = {"features0": features0}
    for kind in ("vtvc", "atlas"):
        pyro.clear_param_store()
        torch.manual_seed(distributed.rank())  # the ranks initialise differently; fits start from rank 0's
        if kind == "vtvc":
            model = VTVCModel(problem.encoder, problem.heads, None, problem.task_names, problem.block_names)
            guide = AmortizedGuide(19, problem.task_names, problem.block_names, hidden_dim=8)
        else:
            model = ATLASModel(problem.encoder, problem.heads, problem.task_names, problem.block_names)
            guide = empty_guide

        last_rank = distributed.rank() == distributed.world_size() - 1
        stop = kill_at if kind == "vtvc" and last_rank else 0

        def kill(info, stop=stop):
            if info.step == stop:
                os.kill(os.getpid(), signal.SIGKILL)

        path = None if checkpoint_dir is None else checkpoint_dir / f"{kind}.pt"
        fit = fit_svi(model, guide, problem.data, SVIConfig(**CONFIG, device=device,
                                                            elbo="trace" if kind == "atlas" else "meanfield"),
                      checkpoint_path=path, callback=kill)
        modules = [model] + ([guide] if kind == "vtvc" else [])
        params = {n: p.detach().cpu().clone() for m in modules for n, p in m.named_parameters()}
        flat = torch.cat([p.reshape(-1) for p in params.values()])
        spread = (distributed.gather_rows(flat[None]) - flat).abs().max()  # parameters differ across ranks?
        out[kind] = {"losses": torch.tensor(fit.tempered_elbo, dtype=torch.float64), "params": params,
                     "rank_spread": spread}
    splits = {name: part for name, (_, part) in zip(problem.task_names, problem.data.parts, strict=True)}
    zeros = torch.zeros(len(problem.task_names), len(problem.block_names))
    metrics = evaluate_encoder(lambda x, ids: encoder(x.to(device), zeros.to(device).expand(len(x), -1, -1)),
                               problem.heads, splits, batch_size=8, device=device)
    out["metrics"] = {task: torch.tensor([m.accuracy, m.nll, m.ece, m.n]) for task, m in metrics.items()}
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    device = sys.argv[4] if len(sys.argv) > 4 else "cpu"
    distributed.init_from_env(device)
    result = run(Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0, device)
    result["world_size"] = distributed.world_size()
    if distributed.is_main():
        torch.save(result, sys.argv[1])
    distributed.shutdown()
