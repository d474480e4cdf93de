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
# # Declaring priors and looking at samples from them
#
# A VTVC prior is data: a small mapping (what a YAML config holds under `prior:`) that
# `vtvc_pyro.priors.PriorSpec` validates and resolves into `[T, B]` tensors for given task and block
# names (METHOD §2). This notebook declares the spike-and-slab prior, its Gaussian ablation, a relaxed
# spike, a Beta hyper-prior on the inclusion probability and per-task / per-block overrides, and draws
# coefficients `coef = gate · slab` from each.

# %%
import os

import matplotlib.pyplot as plt
import torch
from pyro.infer import Predictive

from vtvc_pyro.heads import ClassificationHead, HeadBank
from vtvc_pyro.model import Batch, VTVCModel
from vtvc_pyro.priors import PriorSpec

SMOKE = os.environ.get("VTVC_NOTEBOOK_SMOKE") == "1"  # the test suite runs this notebook quickly
NUM_DRAWS = 200 if SMOKE else 20_000
torch.manual_seed(0)

tasks = ["mnist", "digits", "textures"]
blocks = ["conv1.weight", "transformer.resblocks.0.attn.in_proj_weight",
          "transformer.resblocks.0.mlp.c_fc.weight", "ln_post.weight", "proj"]

# %% [markdown]
# ## Declaring priors
#
# The same mappings can be written in a config file or given on the command line
# (`vtvc run CONFIG --prior.pi=0.2`). Unknown fields and impossible values are errors naming the field.

# %%
declared = {
    "spike-and-slab": {"kind": "spike_and_slab", "pi": 0.5, "slab": {"loc": 0.0, "scale": 1.0}},
    "gaussian (no spike)": {"kind": "gaussian", "slab": {"loc": 0.0, "scale": 1.0}},
    "relaxed spike": {"kind": "spike_and_slab", "pi": 0.5, "temperature": 0.3,
                      "slab": {"loc": 0.0, "scale": 1.0}},
    "Beta(1, 4) on pi": {"kind": "spike_and_slab", "pi_prior": {"a": 1.0, "b": 4.0},
                         "slab": {"loc": 0.0, "scale": 1.0}},
    "overrides": {"kind": "spike_and_slab", "pi": 0.5, "slab": {"loc": 0.0, "scale": 1.0},
                  "overrides": [{"tasks": "mnist", "pi": 0.9},
                                {"blocks": "transformer.resblocks.*", "slab": {"scale": 0.2}}]},
}
priors = {name: PriorSpec.from_mapping(mapping) for name, mapping in declared.items()}
for name, spec in priors.items():
    print(f"{name:22s} {spec.to_mapping()}")

try:
    PriorSpec.from_mapping({"kind": "spike_and_slab", "pi": 1.5})
except ValueError as err:
    print("rejected:", err)

# %% [markdown]
# ## Resolved per task and block
#
# Overrides are fnmatch patterns on task and block names, applied in order.

# %%
resolved = priors["overrides"].resolve(tasks, blocks)
fig, axes = plt.subplots(1, 2, figsize=(10, 2.6), layout="constrained")
for ax, key in zip(axes, ("pi", "slab_scale"), strict=True):
    image = ax.imshow(resolved[key].numpy(), vmin=0, vmax=1, cmap="viridis")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xticks(range(len(blocks)), [b.replace("transformer.resblocks.", "L") for b in blocks], rotation=30,
                  ha="right")
    ax.set_title(key)
    fig.colorbar(image, ax=ax)

# %% [markdown]
# ## Samples: `coef = gate · slab`
#
# With a spike, a share `1 − π` of the coefficients is exactly zero (a task vector left out of a block);
# the relaxed spike puts that mass near zero instead; the hyper-prior makes `π` itself uncertain.


# %% [markdown]
# The draws come from running the Pyro model itself under `pyro.infer.Predictive` (no guide: the prior),
# on one placeholder image: an encoder and heads that ignore the coefficients stand in for the ViT, since
# only the latent sites matter here.

# %%
DIM = 4
heads = HeadBank({t: ClassificationHead(torch.eye(2, DIM), 1.0, ["a", "b"]) for t in tasks})


def encoder(images: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    return torch.ones(images.shape[0], DIM)


first = torch.zeros(1, dtype=torch.long)
one_image = Batch(first, torch.zeros(1, 1), torch.ones(1, DIM), None, first, num_data=1)


def draw(spec: PriorSpec, n: int) -> torch.Tensor:
    """``n`` prior draws of the coefficients, ``[n, T, B]``: the model's ``coef`` site under Predictive."""
    model = VTVCModel(encoder, heads, spec, tasks, blocks)
    return Predictive(model, num_samples=n, return_sites=("coef",))(one_image)["coef"][:, 0]


draws = {name: draw(spec, NUM_DRAWS) for name, spec in priors.items()}
fig, axes = plt.subplots(1, len(draws), figsize=(3.2 * len(draws), 2.8), sharey=True, layout="constrained")
for ax, (name, coef) in zip(axes, draws.items(), strict=True):
    ax.hist(coef.flatten().numpy(), bins=80, range=(-3, 3), density=True)
    ax.set_title(f"{name}\nexact zeros: {(coef == 0).double().mean():.2f}", fontsize=9)
    ax.set_xlabel("coef")
axes[0].set_ylabel("density")

# %% [markdown]
# The share of exact zeros is the prior's sparsity: `1 − π` for a fixed `π`, `1 − E[π] = b / (a + b)` under
# a `Beta(a, b)` hyper-prior, and none for the Gaussian or the relaxed spike.

# %%
for name, coef in draws.items():
    print(f"{name:22s} share of exact zeros {(coef == 0).double().mean().item():.3f}")
print("expected under Beta(1, 4):", 4 / 5)
