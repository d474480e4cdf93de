"""Posterior summaries and predictions of a fitted VTVC guide (METHOD §7): per-sample inclusion, loc, scale
and gate decision; per-(task, block) summaries; the deterministic gated prediction (``guide.point_coef``) and
the Monte Carlo predictive through ``pyro.infer.Predictive`` (whatever the guide samples is what is used),
with entropy, mutual information, ``median()`` / ``quantiles()`` as Pyro's autoguides have them; the mean
coefficients per task for a merged deployable model; exports to pandas and ArviZ (``posterior.nc``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from pyro.infer import Predictive
from torch.utils.data import Dataset

from vtvc_pyro.data import LoaderConfig, batch_loader, sequential_batches
from vtvc_pyro.evaluate import Predict, entropy
from vtvc_pyro.guide import GateSlabGuide
from vtvc_pyro.inference import pretrained_features
from vtvc_pyro.model import Batch, FrozenNetworks, VTVCModel, own_params

SITES = ("gate", "slab", "coef")


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
                 device: torch.device | str = "cpu", loader: LoaderConfig | None = None):
        self.model, self.guide = model, guide
        self.batch_size, self.device, self.loader = batch_size, device, loader

    @property
    def frozen(self) -> FrozenNetworks:
        return self.model.frozen

    def _features0(self, data: Dataset, features0: torch.Tensor | None) -> torch.Tensor:
        if features0 is None:
            return pretrained_features(self.frozen, data, batch_size=self.batch_size, device=self.device,
                                       loader=self.loader)
        if features0.shape[0] != len(data):
            raise ValueError(f"features0 has {features0.shape[0]} rows for a dataset of {len(data)}")
        return features0

    def _batches(self, data: Dataset, features0: torch.Tensor) -> Iterator[Batch]:
        device = self.device
        batches = batch_loader(data, sequential_batches(0, len(data), self.batch_size), self.loader, device)
        for positions, images, labels, task in batches:
            yield Batch(positions.to(device), images.to(device, non_blocking=True),
                        features0[positions].to(device), labels.to(device), task.to(device), len(data))

    def _draws(self, batch: Batch, num_samples: int) -> dict[str, torch.Tensor]:
        """``num_samples`` draws of ``pyro.infer.Predictive(model, guide)`` for a batch: ``gate``, ``slab``,
        ``coef`` ``[S, n, T, B]`` (``gate`` all ones without a spike), ``obs`` ``[S, n]`` and the class
        probabilities ``probs`` ``[S, n, C_max]``."""
        unlabelled = Batch(batch.index, batch.images, batch.features0, None, batch.task, batch.num_data)
        predictive = Predictive(self.model, guide=self.guide, num_samples=num_samples,
                                return_sites=(*SITES, "obs", "_RETURN"))
        draws = predictive(unlabelled)
        out = {"slab": draws["slab"], "coef": draws["coef"], "obs": draws["obs"].reshape(num_samples, -1),
               "probs": draws["_RETURN"].softmax(-1)}
        out["gate"] = draws["gate"] if "gate" in draws else torch.ones_like(draws["slab"])
        return out

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
        part), ``labels``, ``task``; with ``keep_draws`` also ``gate``/``slab``/``coef`` ``[S, N, T, B]``, and
        per draw ``[S, N]``: predicted ``obs``, ``log_likelihood`` of the label, ``draw_entropy``,
        ``draw_correct``."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        features0 = self._features0(data, features0)
        parts: dict[str, list[torch.Tensor]] = {}
        for batch in self._batches(data, features0):
            draws = self._draws(batch, num_samples)
            probs = draws["probs"]
            mean = probs.mean(0)
            out = {"probs": mean, "entropy": entropy(mean),
                   "mutual_information": entropy(mean) - entropy(probs).mean(0),
                   "labels": batch.labels, "task": batch.task}
            if keep_draws:
                picked = probs.gather(-1, batch.labels[None, :, None].expand(num_samples, -1, 1))[..., 0]
                out.update({k: draws[k] for k in (*SITES, "obs")}, log_likelihood=picked.log(),
                           draw_entropy=entropy(probs), draw_correct=probs.argmax(-1) == batch.labels)
            for key, value in out.items():
                parts.setdefault(key, []).append(value.cpu())
        draw_keys = (*SITES, "obs", "log_likelihood", "draw_entropy", "draw_correct")
        return {k: torch.cat(v, dim=1 if k in draw_keys else 0) for k, v in parts.items()}

    @torch.no_grad()
    @own_params()
    def quantiles(self, data: Dataset, quantiles: Sequence[float], num_samples: int = 100,
                  features0: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per sample, the empirical ``quantiles`` of the sites ``gate``, ``slab``, ``coef`` over
        ``num_samples`` posterior draws: ``[len(quantiles), N, T, B]`` (as ``AutoNormal.quantiles``)."""
        q = torch.as_tensor(list(quantiles), dtype=torch.float64)
        if q.numel() == 0 or not bool(((q >= 0) & (q <= 1)).all()):
            raise ValueError(f"quantiles must be a non-empty list in [0, 1], got {list(quantiles)}")
        draws = self.predictive(data, num_samples, features0, keep_draws=True)
        return {k: torch.quantile(draws[k].double(), q, dim=0).float() for k in SITES}

    def median(self, data: Dataset, num_samples: int = 100, features0: torch.Tensor | None = None
               ) -> dict[str, torch.Tensor]:
        """Per sample, the posterior median of ``gate``, ``slab``, ``coef`` ``[N, T, B]``."""
        return {k: v[0] for k, v in self.quantiles(data, [0.5], num_samples, features0).items()}

    def to_inference_data(self, data: Dataset, num_samples: int = 20,
                          features0: torch.Tensor | None = None) -> Any:
        """An ArviZ ``InferenceData`` for ``data`` (the test samples):

        - ``posterior``: draws of ``gate``, ``slab``, ``coef`` (dims chain, draw, sample, task, block);
        - ``posterior_predictive`` / ``observed_data``: ``obs`` (predicted and true labels);
        - ``log_likelihood``: ``obs`` per draw (for ``az.loo``);
        - ``sample_stats``: per draw and sample, predictive ``entropy`` and ``correct``;
        - ``constant_data``: each sample's ``data_task`` (its head's name), the guide's ``inclusion``,
          ``loc``, ``scale`` and gate ``decision``, the predictive ``entropy`` and ``mutual_information``,
          the prior's ``prior_inclusion`` (task, block: π, or ``E_q[π]`` under a Beta hyper-prior).
        """
        import arviz as az

        features0 = self._features0(data, features0)
        pred = self.predictive(data, num_samples, features0, keep_draws=True)
        summary = self.summarize(data, features0)
        shape = (self.model.num_tasks, self.model.num_blocks)
        if self.model.prior.hierarchical:  # pi is latent: its posterior mean, the learned usage rate
            with torch.no_grad():
                prior_pi = self.guide.pi_dist().mean.cpu()
        elif self.model.prior.has_spike:
            prior_pi = self.model.prior_params()["pi"].cpu()
        else:
            prior_pi = torch.ones(shape)
        names = np.asarray(self.frozen.heads.task_names, dtype=str)
        dims = ["sample", "task", "block"]
        constant = {"data_task": names[pred["task"].numpy()],
                    "mutual_information": pred["mutual_information"].numpy(),
                    "entropy": pred["entropy"].numpy(),
                    "prior_inclusion": prior_pi.numpy(), "decision": summary["gate"].numpy(),
                    **{k: summary[k].numpy() for k in ("inclusion", "loc", "scale")}}
        per_sample = {"data_task": ["sample"], "mutual_information": ["sample"], "entropy": ["sample"],
                      "prior_inclusion": ["task", "block"], "decision": dims,
                      **{k: dims for k in ("inclusion", "loc", "scale")}}
        return az.from_dict(
            posterior={k: pred[k][None].numpy() for k in SITES},
            posterior_predictive={"obs": pred["obs"][None].numpy()},
            log_likelihood={"obs": pred["log_likelihood"][None].numpy()},
            sample_stats={"entropy": pred["draw_entropy"][None].numpy(),
                          "correct": pred["draw_correct"][None].numpy()},
            observed_data={"obs": pred["labels"].numpy()},
            constant_data=constant,
            coords={"sample": list(range(len(data))), "task": self.guide.task_names,
                    "block": self.guide.block_names},
            dims={**{k: dims for k in SITES}, "obs": ["sample"], "entropy": ["sample"], "correct": ["sample"],
                  **per_sample},
        )
