"""Posterior summaries and predictions of a fitted VTVC guide (METHOD §7): per-sample inclusion, loc, scale
and gate decision; per-(task, block) summaries; the deterministic gated prediction and the Monte Carlo
predictive with entropy and mutual information; the mean coefficients per task for a merged deployable model;
exports to pandas and ArviZ."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pandas as pd
import torch
from pyro import poutine
from torch.utils.data import Dataset

from vtvc_pyro.guide import GateSlabGuide
from vtvc_pyro.inference import pretrained_features
from vtvc_pyro.model import Batch, FrozenNetworks, VTVCModel, own_params

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(probs, probs).sum(-1)


def coefficient_predictor(frozen: FrozenNetworks,
                          point_coef: Callable[[torch.Tensor], torch.Tensor]) -> Predict:
    """``predict(images, task) -> [n, C_max]`` class probabilities of each sample under its own head, with
    coefficients ``point_coef(normalize(f(x; θ0)))`` (a guide's, or a baseline's ``point_coef``)."""

    @torch.no_grad()
    def predict(images: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        coef = point_coef(frozen.features0(images))
        return frozen.logits(images, task, coef).softmax(-1)

    return predict


class Posterior:
    """Read-outs of a fitted ``guide`` for ``model``; all helpers run without gradients on the parameters the
    modules hold."""

    def __init__(self, model: VTVCModel, guide: GateSlabGuide, *, batch_size: int = 256,
                 device: torch.device | str = "cpu"):
        self.model, self.guide = model, guide
        self.batch_size, self.device = batch_size, device

    @property
    def frozen(self) -> FrozenNetworks:
        return self.model.frozen

    def _features0(self, data: Dataset, features0: torch.Tensor | None) -> torch.Tensor:
        if features0 is None:
            return pretrained_features(self.frozen, data, batch_size=self.batch_size, device=self.device)
        if features0.shape[0] != len(data):
            raise ValueError(f"features0 has {features0.shape[0]} rows for a dataset of {len(data)}")
        return features0

    def _batches(self, data: Dataset, features0: torch.Tensor) -> Iterator[Batch]:
        for start in range(0, len(data), self.batch_size):
            positions = torch.arange(start, min(start + self.batch_size, len(data)))
            yield Batch.collate(data, positions, features0, self.device)

    def _draws(self, batch: Batch, num_samples: int) -> dict[str, torch.Tensor]:
        """``num_samples`` guide draws for a batch: ``gate``, ``slab``, ``coef`` ``[S, n, T, B]`` and the
        class probabilities ``probs`` ``[S, n, C_max]``."""
        out: dict[str, list[torch.Tensor]] = {"gate": [], "slab": [], "coef": [], "probs": []}
        for _ in range(num_samples):
            trace = poutine.trace(self.guide).get_trace(batch)
            slab = trace.nodes["slab"]["value"]
            gate = trace.nodes["gate"]["value"] if "gate" in trace.nodes else torch.ones_like(slab)
            coef = gate * slab
            probs = self.frozen.logits(batch.images, batch.task, coef).softmax(-1)
            for key, value in (("gate", gate), ("slab", slab), ("coef", coef), ("probs", probs)):
                out[key].append(value)
        return {key: torch.stack(values) for key, values in out.items()}

    @torch.no_grad()
    @own_params()
    def predict(self, images: torch.Tensor, task: torch.Tensor, num_samples: int = 0) -> torch.Tensor:
        """``[n, C_max]`` class probabilities: the deterministic gated prediction (``num_samples = 0``,
        ``coef = 1[p_eff ≥ 0.5] · μ``) or the Monte Carlo predictive mean over ``num_samples`` guide draws."""
        features0 = self.frozen.features0(images)
        if num_samples == 0:
            return self.frozen.logits(images, task, self.guide.point_coef(features0)).softmax(-1)
        n = images.shape[0]
        batch = Batch(torch.arange(n, device=images.device), images, features0, None, task, n)
        return self._draws(batch, num_samples)["probs"].mean(0)

    @torch.no_grad()
    @own_params()
    def summarize(self, data: Dataset, features0: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per sample ``[N, T, B]``: ``inclusion`` ``p_eff = sigmoid(ℓ) · F`` (1 without a spike), ``loc``,
        ``scale``, the evaluation ``gate`` decision and ``coef = gate · loc``; and ``task`` ``[N]``, each
        sample's head."""
        features0 = self._features0(data, features0)
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("inclusion", "loc", "scale", "gate", "coef")}
        for start in range(0, len(data), self.batch_size):
            chunk = features0[start:start + self.batch_size].to(self.device)
            logits, loc, scale = self.guide.components(chunk)
            gate = self.guide.decide(logits, loc, scale)
            inclusion = self.guide.effective_inclusion(logits, loc, scale)
            for key, value in zip(parts, (inclusion, loc, scale, gate, gate * loc), strict=True):
                parts[key].append(value.cpu())
        out = {key: torch.cat(values) for key, values in parts.items()}
        task_ids = getattr(data, "task_ids", None)  # MultiTaskDataset knows them without loading images
        if task_ids is None:
            task_ids = torch.tensor([int(data[i][3]) for i in range(len(data))])
        out["task"] = task_ids
        return out

    def component_summary(self, summary: dict[str, torch.Tensor], by_data_task: bool = False) -> pd.DataFrame:
        """Means over samples per (task vector, block) — and per data task (the samples' head) when
        ``by_data_task``: inclusion, loc, scale, active share (mean gate), and mean and std of ``coef``."""
        frame = self.to_dataframe(summary)
        keys = (["data_task"] if by_data_task else []) + ["task", "block"]
        grouped = frame.groupby(keys, sort=False)
        table = grouped[["inclusion", "loc", "scale"]].mean()
        table["active"] = grouped["gate"].mean()
        table["coef_mean"] = grouped["coef"].mean()
        table["coef_std"] = grouped["coef"].std(ddof=0)
        return table

    def task_coefficients(self, summary: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``λ̄[t, b]`` per data task: the mean evaluation ``coef`` over that task's samples (METHOD §7: one
        merge per task gives a plain encoder with no extra inference cost)."""
        names, task = self.frozen.heads.task_names, summary["task"]
        return {names[k]: summary["coef"][task == k].mean(0) for k in task.unique().tolist()}

    def to_dataframe(self, summary: dict[str, torch.Tensor]) -> pd.DataFrame:
        """One row per (sample, task vector, block): ``sample``, ``data_task``, ``task``, ``block``,
        ``inclusion``, ``loc``, ``scale``, ``gate``, ``coef``."""
        n, t, b = summary["coef"].shape
        grid = torch.cartesian_prod(torch.arange(n), torch.arange(t), torch.arange(b))
        heads = self.frozen.heads.task_names
        frame = pd.DataFrame({
            "sample": grid[:, 0].numpy(),
            "data_task": pd.Categorical.from_codes(summary["task"][grid[:, 0]].numpy(), heads),
            "task": pd.Categorical.from_codes(grid[:, 1].numpy(), self.guide.task_names),
            "block": pd.Categorical.from_codes(grid[:, 2].numpy(), self.guide.block_names),
        })
        for key in ("inclusion", "loc", "scale", "gate", "coef"):
            frame[key] = summary[key].reshape(-1).numpy()
        return frame

    @torch.no_grad()
    @own_params()
    def predictive(self, data: Dataset, num_samples: int = 20, features0: torch.Tensor | None = None,
                   keep_draws: bool = False) -> dict[str, torch.Tensor]:
        """Monte Carlo predictive over ``num_samples`` guide draws: ``probs`` ``[N, C_max]`` (mean),
        ``entropy`` (of the mean), ``mutual_information`` (entropy minus mean per-draw entropy: the epistemic
        part), ``labels``, ``task``; with ``keep_draws`` also ``gate``/``slab``/``coef`` ``[S, N, T, B]`` and
        per-draw ``log_likelihood`` ``[S, N]``."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        features0 = self._features0(data, features0)
        parts: dict[str, list[torch.Tensor]] = {}
        for batch in self._batches(data, features0):
            draws = self._draws(batch, num_samples)
            probs = draws["probs"]
            mean = probs.mean(0)
            out = {"probs": mean, "entropy": _entropy(mean),
                   "mutual_information": _entropy(mean) - _entropy(probs).mean(0),
                   "labels": batch.labels, "task": batch.task}
            if keep_draws:
                picked = probs.gather(-1, batch.labels[None, :, None].expand(num_samples, -1, 1))[..., 0]
                out.update({k: draws[k] for k in ("gate", "slab", "coef")}, log_likelihood=picked.log())
            for key, value in out.items():
                parts.setdefault(key, []).append(value.cpu())
        draw_keys = ("gate", "slab", "coef", "log_likelihood")
        return {k: torch.cat(v, dim=1 if k in draw_keys else 0) for k, v in parts.items()}

    def to_inference_data(self, data: Dataset, num_samples: int = 20,
                          features0: torch.Tensor | None = None) -> Any:
        """An ArviZ ``InferenceData``: posterior draws of ``gate``, ``slab``, ``coef`` (dims sample, task,
        block; one chain), the ``obs`` log-likelihood per draw (for ``az.loo``), observed labels and each
        sample's data task."""
        import arviz as az

        pred = self.predictive(data, num_samples, features0, keep_draws=True)
        dims = ["sample", "task", "block"]
        return az.from_dict(
            posterior={k: pred[k][None].numpy() for k in ("gate", "slab", "coef")},
            log_likelihood={"obs": pred["log_likelihood"][None].numpy()},
            observed_data={"obs": pred["labels"].numpy()},
            constant_data={"data_task": pred["task"].numpy()},
            coords={"sample": list(range(len(data))), "task": self.guide.task_names,
                    "block": self.guide.block_names},
            dims={"gate": dims, "slab": dims, "coef": dims, "obs": ["sample"], "data_task": ["sample"]},
        )
