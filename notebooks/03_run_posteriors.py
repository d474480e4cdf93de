# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Inspecting the posteriors of a run directory
#
# `vtvc run` leaves, per VTVC method, `posteriors/<method>/<problem>/samples.safetensors` (per test image:
# inclusion probabilities, slab loc and scale, the gate decision and the coefficients, with the prediction's
# confidence, correctness and entropy), `components.csv` and `task_coef.safetensors`. This notebook reads
# them: inclusion heatmaps, per-sample coefficients, uncertainty against correctness, and what gating
# turned off.
#
# Set `VTVC_RUN_DIR` to a run directory (default: `../runs/quickstart`, what `make run` writes). In smoke
# mode (`VTVC_NOTEBOOK_SMOKE=1`) the notebook first runs a tiny experiment on the micro zoo.

# %%
import json
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch

from vtvc_pyro.experiment import run_experiment
from vtvc_pyro.experiment.figures import load_samples

SMOKE = os.environ.get("VTVC_NOTEBOOK_SMOKE") == "1"
if os.environ.get("VTVC_RUN_DIR"):
    run_dir = Path(os.environ["VTVC_RUN_DIR"])
elif SMOKE:
    scratch = tempfile.TemporaryDirectory()  # removed when the kernel exits
    run_dir = run_experiment(Path("..", "experiments", "configs", "smoke.yaml"),
                             ["--methods=[zeroshot, finetuned, vtvc]"],
                             out=Path(scratch.name) / "smoke", progress=False)
else:
    run_dir = Path("..", "runs", "quickstart")
METHOD = "vtvc"
print(run_dir)

# %% [markdown]
# ## The comparison table

# %%
metrics = json.loads((run_dir / "metrics.json").read_text())
table = pd.read_csv(run_dir / "table.csv", index_col="method")
table[["mean_accuracy", "mean_normalized_accuracy", "nll", "ece", "sparsity", "active_per_block"]]

# %% [markdown]
# ## Per-sample posterior of one method

# %%
problem = "all" if metrics["protocol"] == "task_addition" else metrics["tasks"][0]
samples, meta = load_samples(run_dir / "posteriors" / METHOD / problem / "samples.safetensors")
vectors, blocks, data_tasks = meta["task_names"], meta["block_names"], meta["data_tasks"]
print({k: tuple(v.shape) for k, v in samples.items()})

# %% [markdown]
# ### Inclusion probabilities, tasks × blocks
#
# Left: the posterior inclusion probability `sigmoid(ℓ)`, averaged over test images. Right: how often the
# gating rule kept each component (it also drops components whose coefficient is small against its
# uncertainty).

# %%
fig, axes = plt.subplots(2, 1, figsize=(12, 1.2 + 0.9 * len(vectors)), layout="constrained")
for ax, key, title in ((axes[0], "inclusion", "mean inclusion probability"),
                       (axes[1], "gate", "share of test images whose gate keeps the component")):
    image = ax.imshow(samples[key].mean(0).numpy(), aspect="auto", vmin=0, vmax=1)
    ax.set_yticks(range(len(vectors)), vectors)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.02)
axes[1].set_xlabel("block")

# %% [markdown]
# ### Per-sample coefficients
#
# Each test image gets its own coefficients. The block-averaged coefficient of every task vector, split by
# the image's own task: a sample-specific composition leans on the task vector of the image's task.

# %%
per_vector = samples["coef"].mean(-1)  # [N, T]
fig, axes = plt.subplots(1, len(vectors), figsize=(3.2 * len(vectors), 2.8), sharey=True, squeeze=False,
                         layout="constrained")
for t, ax in enumerate(axes[0]):
    for k, task in enumerate(data_tasks):
        values = per_vector[samples["task"] == k, t].numpy()
        ax.hist(values, bins=30, alpha=0.5, label=task)
    ax.set_title(f"task vector {vectors[t]}", fontsize=9)
    ax.set_xlabel("mean coefficient")
axes[0, 0].legend(fontsize=7)
frame = pd.DataFrame(per_vector.numpy(), columns=vectors)
frame["samples of task"] = [data_tasks[k] for k in samples["task"].tolist()]
frame.groupby("samples of task").mean().round(3)  # rows: the images' task; columns: task vectors

# %% [markdown]
# ### Uncertainty against correctness
#
# A useful uncertainty is higher on the images the model gets wrong. The AUROC of the predictive entropy
# for telling errors from correct predictions is 0.5 for an uninformative uncertainty and 1 for a perfect
# one (computed here from ranks: the Mann–Whitney statistic).

# %%
correct = samples["correct"].bool()
entropy = samples["entropy"]
coef_scale = samples["scale"].mean((1, 2))  # the posterior's own uncertainty about the coefficients


def auroc(score: torch.Tensor, positive: torch.Tensor) -> float:
    ranks = score.argsort().argsort().double() + 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return ((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


print(f"accuracy {correct.double().mean():.3f}; AUROC(entropy → error) {auroc(entropy, ~correct):.3f}; "
      f"AUROC(mean slab scale → error) {auroc(coef_scale, ~correct):.3f}")
fig, ax = plt.subplots(figsize=(5, 3))
ax.hist([entropy[correct].numpy(), entropy[~correct].numpy()], bins=20, label=["correct", "wrong"],
        density=True)
ax.set_xlabel("predictive entropy")
ax.legend()

# %% [markdown]
# ### What gating turned off
#
# A component is dropped when its inclusion probability is below 0.5, or when its coefficient is small
# against its uncertainty (`|μ| < τ0 · (1 + β · tanh(σ / |μ|))`). The second kind is what gating adds to a
# plain spike-and-slab: listed are the components it drops most often although the guide would include them.

# %%
print(f"share of gated-off components: {(samples['coef'] == 0).double().mean():.3f}")
likely = samples["inclusion"] >= 0.5
by_uncertainty = (likely & (samples["gate"] == 0)).double().mean(0)  # [T, B]
print(f"dropped by the inclusion probability: {(~likely).double().mean():.3f}; "
      f"by the uncertainty threshold: {by_uncertainty.mean():.3f}")
dropped = pd.DataFrame({"task": [v for v in vectors for _ in blocks], "block": blocks * len(vectors),
                        "dropped_by_uncertainty": by_uncertainty.flatten().numpy()})
components = pd.read_csv(run_dir / "posteriors" / METHOD / problem / "components.csv").merge(
    dropped, on=["task", "block"])
components.sort_values("dropped_by_uncertainty", ascending=False).head(10)[
    ["task", "block", "inclusion", "loc", "scale", "active", "dropped_by_uncertainty"]].round(3)
