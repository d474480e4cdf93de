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
# # A small SVI experiment, step by step
#
# The data flow of VTVC on the embedded zoo, with the library's pieces (what `vtvc run` does for every
# method): checkpoints → task-vector bank → prior, model and amortized guide → SVI → posterior →
# evaluation. Smoke mode (`VTVC_NOTEBOOK_SMOKE=1`, used by the tests) takes the micro zoo and a few steps.

# %%
import os

import matplotlib.pyplot as plt
import torch

from vtvc_pyro.compose import ComposedEncoder
from vtvc_pyro.data import MultiTaskDataset
from vtvc_pyro.experiment.scoring import encoder_predictor, predict_dataset, scores_from_probs
from vtvc_pyro.guide import AmortizedGuide
from vtvc_pyro.inference import SVIConfig, fit_svi
from vtvc_pyro.model import VTVCModel
from vtvc_pyro.posterior import Posterior
from vtvc_pyro.zoo import load_zoo

SMOKE = os.environ.get("VTVC_NOTEBOOK_SMOKE") == "1"
torch.set_num_threads(1)  # tiny ViTs run fastest on one thread
torch.manual_seed(0)

# %% [markdown]
# ## The zoo, its task vectors and heads
#
# The zoo is built on first use (minutes) and cached. Its task vectors `τ_t = θ_t − θ0` live in one
# `[T, P]` buffer, partitioned into blocks (one per parameter tensor).

# %%
zoo = load_zoo("micro" if SMOKE else "default")
bank = zoo.bank(blocks="tensor")
visual = zoo.create_model().visual.eval()
print(zoo)
print(f"{bank.num_tasks} task vectors × {bank.num_blocks} blocks, {bank.num_params} parameters each")

fit_data = MultiTaskDataset({t: zoo.split(t, "val") for t in zoo.task_names}, zoo.task_names)
test_data = MultiTaskDataset({t: zoo.split(t, "test") for t in zoo.task_names}, zoo.task_names)
print(f"fit on the union of val splits: {len(fit_data)} images; test: {len(test_data)} images")

# %% [markdown]
# ## Prior, model, guide
#
# The model samples `gate`, `slab`, `coef` for every image, task vector and block, and scores the image
# with its own task's head on the composed encoder. The guide reads the frozen pre-trained features.

# %%
prior = {"kind": "spike_and_slab", "pi": 0.5, "slab": {"loc": 0.0, "scale": 1.0}}
encoder = ComposedEncoder(visual, bank)
model = VTVCModel(encoder, zoo.heads, prior, bank.task_names, bank.block_names)
feature_dim = visual.output_dim
guide = AmortizedGuide(feature_dim, bank.task_names, bank.block_names, prior, gating="gated")

# %% [markdown]
# ## SVI
#
# Mini-batches are scaled to the full data, so the loss is a true ELBO; it is reported per datum.
# Every image has its own `T · B` latent components, so at weight 1 their KL swamps the one label's
# log-likelihood; `kl_weight` down-weights it (the quickstart uses 0.001). That optimises a tempered
# objective; every step records it, the ELBO at weight 1, and the ELBO's two parts.

# %%
config = SVIConfig(steps=4 if SMOKE else 200, batch_size=16 if SMOKE else 32, lr=1e-2, kl_weight=1e-3,
                   progress=not SMOKE)
fit = fit_svi(model, guide, fit_data, config)
fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
steps = range(1, len(fit.history) + 1)
left.plot(steps, fit.tempered_elbo, label="tempered ELBO (optimised)")
left.plot(steps, fit.expected_log_likelihood, label="expected log-likelihood")
left.set_xlabel("step")
left.set_ylabel("per datum")
left.legend()
right.plot(steps, fit.elbo, label="ELBO at KL weight 1")
right.set_xlabel("step")
right.legend()
print(f"{fit.steps} steps in {fit.seconds:.1f} s")

# %% [markdown]
# ## Posterior and evaluation
#
# At evaluation the coefficient is deterministic: `coef = 1[p_eff ≥ 0.5] · μ`, `p_eff = sigmoid(ℓ) · F` with
# the gating filter `F`.

# %%
post = Posterior(model, guide, batch_size=256)
summary = post.summarize(test_data)
print({k: tuple(v.shape) for k, v in summary.items()})
print(f"share of gated-off components: {(summary['coef'] == 0).double().mean():.3f}")

heads = zoo.heads
for name, predict in {"zero-shot": encoder_predictor(visual, heads), "VTVC (gated)": post.predict}.items():
    probs, labels, task = predict_dataset(predict, test_data, batch_size=256)
    scores = scores_from_probs(probs, labels, task, heads)
    print(f"{name:14s}", {t: round(m.accuracy, 3) for t, m in scores.tasks.items()})

# %%
fig, ax = plt.subplots(figsize=(8, 2.5))
image = ax.imshow(summary["inclusion"].mean(0).numpy(), aspect="auto", vmin=0, vmax=1)
ax.set_yticks(range(bank.num_tasks), bank.task_names)
ax.set_xlabel("block")
ax.set_title("mean inclusion probability over test images")
fig.colorbar(image, ax=ax)
