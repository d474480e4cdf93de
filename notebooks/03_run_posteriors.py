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
# # Inspecting the posteriors of a run directory with ArviZ
#
# `vtvc run` leaves, per VTVC method, `posteriors/<method>/<problem>/posterior.nc`: an ArviZ `InferenceData`
# drawn through `pyro.infer.Predictive` for the test images — `posterior` draws of the sites `gate`, `slab`,
# `coef` (dims sample × task × block), the `posterior_predictive` labels `obs`, the `observed_data`, the
# per-draw `log_likelihood` and `sample_stats` (predictive entropy, correctness), and `constant_data` (each
# image's task, the guide's inclusion / loc / scale and gate decision, the prior's inclusion π). This
# notebook reads it: ArviZ summaries with credible intervals, a forest plot per task and layer, prior vs
# posterior inclusion, and where uncertainty flags errors.
#
# Set `VTVC_RUN_DIR` to a run directory (default: `../runs/quickstart`, what `make run` writes). In smoke
# mode (`VTVC_NOTEBOOK_SMOKE=1`) the notebook first runs a tiny experiment on the micro zoo.

# %%
import json
import os
import tempfile
from pathlib import Path

import arviz as az
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from vtvc_pyro.experiment import run_experiment
from vtvc_pyro.experiment.figures import load_posterior
from vtvc_pyro.experiment.plots import by_layer, layer_of

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
# ## The posterior of one method

# %%
problem = "all" if metrics["protocol"] == "task_addition" else metrics["tasks"][0]
idata = load_posterior(run_dir / "posteriors" / METHOD / problem / "posterior.nc")
vectors = [str(t) for t in idata.posterior["task"].values]
blocks = [str(b) for b in idata.posterior["block"].values]
layers = list(dict.fromkeys(layer_of(b) for b in blocks))
print(idata)

# %% [markdown]
# ### ArviZ summary with 90 % credible intervals
#
# `coef = gate · slab` per test image, task vector and block. Averaged over a task's images and over the
# blocks of each layer it stays readable for a real ViT's ~150 blocks.

# %%
per_layer, _ = by_layer(idata.posterior["coef"].values, blocks)  # [chain, draw, sample, task, layer]
data_task = np.asarray(idata.constant_data["data_task"].values).astype(str)
image_tasks = list(dict.fromkeys(data_task))
by_task = np.stack([per_layer[:, :, data_task == t].mean(2) for t in image_tasks], axis=2)
layered = az.from_dict(posterior={"coef": by_task},
                       coords={"image_task": image_tasks, "vector": vectors, "layer": layers},
                       dims={"coef": ["image_task", "vector", "layer"]})
summary = az.summary(layered, kind="stats", hdi_prob=0.9)
summary.head(12)

# %% [markdown]
# ### Forest plot: the coefficient of each task vector per layer, on the images of each task

# %%
height = 0.25 * len(vectors) * len(layers) + 1
axes = az.plot_forest(layered, var_names=["coef"], combined=True, hdi_prob=0.9,
                      coords={"image_task": image_tasks[0]}, figsize=(6, height))
axes[0].set_title(f"coef on {image_tasks[0]} images: median and 90 % HDI")

# %% [markdown]
# ### Prior vs posterior inclusion, task vector × layer
#
# Left: the prior's inclusion probability π (under a Beta hyper-prior, as in the main job, the posterior
# mean of the learned usage rate π[t, b]). Right: the guide's effective inclusion probability
# `p_eff = sigmoid(ℓ) · F` (`F` the gating filter: what `q(gate)` draws with), averaged over test images and
# the blocks of a layer. Where the data pull a component in or out, the two differ.

# %%
prior, _ = by_layer(idata.constant_data["prior_inclusion"].values, blocks)
posterior, _ = by_layer(idata.constant_data["inclusion"].values.mean(0), blocks)
fig, axes = plt.subplots(1, 2, figsize=(12, 1.5 + 0.6 * len(vectors)), sharey=True, layout="constrained")
for ax, values, title in ((axes[0], prior, "prior π"), (axes[1], posterior, "posterior mean p_eff")):
    image = ax.imshow(values, aspect="auto", vmin=0, vmax=1)
    ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=7)
    ax.set_title(title)
axes[0].set_yticks(range(len(vectors)), vectors)
fig.colorbar(image, ax=axes, fraction=0.02)

# %% [markdown]
# ### Uncertainty against correctness
#
# A useful uncertainty is higher on the images the model gets wrong. The AUROC (scikit-learn) of each
# uncertainty for telling errors from correct predictions is 0.5 when uninformative and 1 when perfect:
# the predictive entropy, the mutual information (the epistemic part, from the spread of the draws) and the
# guide's mean slab scale.

# %%
correct = idata.sample_stats["correct"].values.mean((0, 1)) >= 0.5  # the majority of the draws is right
scores = {"predictive entropy": idata.constant_data["entropy"].values,
          "mutual information": idata.constant_data["mutual_information"].values,
          "mean slab scale": idata.constant_data["scale"].values.mean((1, 2))}
if correct.all() or not correct.any():
    print("only one class of outcome: AUROC undefined")
else:
    print({name: round(roc_auc_score(~correct, value), 3) for name, value in scores.items()})
fig, ax = plt.subplots(figsize=(5, 3))
entropy = scores["predictive entropy"]
ax.hist([entropy[correct], entropy[~correct]], bins=20, label=["correct", "wrong"], density=True)
ax.set_xlabel("predictive entropy")
ax.legend()

# %% [markdown]
# ### What gating turned off
#
# A component is off at evaluation when `p_eff < 0.5`: either the filter removed it (`F = 0`: its
# coefficient is small against its uncertainty, `|μ| < τ0 · (1 + β · tanh(σ / |μ|))`, so `p_eff = 0` and
# nothing is ever sampled for it), or its inclusion probability `sigmoid(ℓ)` is below 0.5. The histogram of
# `p_eff` over every (test image, component) shows whether the inclusion probabilities separate components.
# A component the labels say nothing about keeps its prior, `p_eff ≈ π`. With a fixed π = 0.5 that was
# about half of the T · B = 336 gates per image on the default zoo, a spike on the decision threshold. The
# main job learns each component's usage rate instead (`prior.pi_prior: {a: 1, b: 1}`, π[t, b] ~ Beta(1, 1)
# with a Beta posterior, shown above as "prior π"), so the components no image needs move to low rates and
# off; on the main job's run about 6 % of `p_eff` lie within 0.05 of 0.5 (the README's held-out table).

# %%
decision = idata.constant_data["decision"].values
p_eff = idata.constant_data["inclusion"].values
filtered = p_eff == 0
print(f"share of gated-off components: {1 - decision.mean():.3f}; removed by the filter: "
      f"{filtered.mean():.3f}; off by the inclusion probability: {(~filtered & (decision == 0)).mean():.3f}")
fig, ax = plt.subplots(figsize=(5, 3))
ax.hist(p_eff.ravel(), bins=40, range=(0, 1))
ax.set_yscale("log")
ax.set_xlabel("effective inclusion probability p_eff (test images × components)")
ax.set_ylabel("count")
