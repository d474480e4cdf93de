"""Deterministic baselines (METHOD §8) trained by cross-entropy through the same SVI engine: each is a Pyro
model with parameters, a ``coef`` site and the ``obs`` site, paired with :func:`empty_guide`, so the ELBO is
exactly the (data-scaled) log-likelihood."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import torch
from pyro.nn import PyroModule
from torch import nn

from vtvc_pyro.guide import amortizer
from vtvc_pyro.heads import HeadBank
from vtvc_pyro.model import Batch, Encoder, FrozenNetworks, observe, own_params, plates, require_finite_params


def empty_guide(batch: Batch, kl_scale: float = 1.0) -> None:
    """No latent sites: with it, ``Trace_ELBO`` is the cross-entropy of the model's ``obs`` site."""


class ATLASModel(PyroModule):
    """aTLAS: task-level coefficients ``λ ∈ R^{T×B}`` shared by every sample, learned by cross-entropy::

        coef[n, t, b] = λ[t, b]                          (deterministic; λ a parameter, init 0 as aTLAS does)
        obs[n]        ~ Categorical(logits = H_task(n)(f(x_n; θ0 + Σ λ[t, b] τ_t^(b))))
    """

    def __init__(self, encoder: Encoder, heads: HeadBank, task_names: Sequence[str],
                 block_names: Sequence[str], init: float | torch.Tensor = 0.0):
        super().__init__()
        self.task_names, self.block_names = list(task_names), list(block_names)
        shape = (len(self.task_names), len(self.block_names))
        init = torch.as_tensor(init, dtype=torch.float32)
        if init.shape not in (torch.Size(), torch.Size(shape)):
            raise ValueError(f"init must be a number or [T, B] = {list(shape)}, got shape {list(init.shape)}")
        self.frozen = FrozenNetworks(encoder, heads, *shape)
        self.coefficients = nn.Parameter(init.expand(shape).clone())

    def coef(self, num: int) -> torch.Tensor:
        # an expanded view (stride 0 along the samples): ComposedEncoder merges λ once per layer and runs a
        # plain forward, under autograd too, instead of composing per sample
        return self.coefficients.expand(num, *self.coefficients.shape)

    def forward(self, batch: Batch, kl_scale: float = 1.0) -> torch.Tensor:
        data, tasks, blocks = plates(batch, *self.coefficients.shape)
        with data:
            with tasks, blocks:
                coef = pyro.deterministic("coef", self.coef(batch.index.shape[0]))
            require_finite_params(self, "site 'coef'")
            return observe(self.frozen, batch, coef)

    @torch.no_grad()
    @own_params()
    def point_coef(self, features0: torch.Tensor) -> torch.Tensor:
        """``[n, T, B]``: the learned ``λ`` for every sample."""
        return self.coef(features0.shape[0]).clone()


class MetaNetModel(PyroModule):
    """A deterministic sample-specific meta-network: the guide's ``g_φ`` outputs ``λ_n`` directly::

        coef[n] = g_φ(normalize(f(x_n; θ0)))             (deterministic, [T, B] per sample)
        obs[n]  ~ Categorical(logits = H_task(n)(f(x_n; θ(coef[n]))))
    """

    def __init__(self, encoder: Encoder, heads: HeadBank, feature_dim: int, task_names: Sequence[str],
                 block_names: Sequence[str], *, hidden_dim: int | None = None, init_coef: float = 0.3,
                 init_weight_scale: float = 0.01):
        super().__init__()
        self.task_names, self.block_names = list(task_names), list(block_names)
        self.feature_dim = feature_dim
        self.frozen = FrozenNetworks(encoder, heads, len(self.task_names), len(self.block_names))
        self.net = amortizer(feature_dim, len(self.task_names) * len(self.block_names), hidden_dim)
        with torch.no_grad():
            self.net[-1].weight.mul_(init_weight_scale)
            self.net[-1].bias.fill_(init_coef)

    def coef(self, features0: torch.Tensor) -> torch.Tensor:
        if features0.ndim != 2 or features0.shape[1] != self.feature_dim:
            raise ValueError(f"features0 must be [n, {self.feature_dim}], got shape {tuple(features0.shape)}")
        return self.net(features0).view(-1, len(self.task_names), len(self.block_names))

    def forward(self, batch: Batch, kl_scale: float = 1.0) -> torch.Tensor:
        data, tasks, blocks = plates(batch, len(self.task_names), len(self.block_names))
        with data:
            with tasks, blocks:
                coef = pyro.deterministic("coef", self.coef(batch.features0))
            require_finite_params(self, "site 'coef'")
            return observe(self.frozen, batch, coef)

    @torch.no_grad()
    @own_params()
    def point_coef(self, features0: torch.Tensor) -> torch.Tensor:
        """``[n, T, B]`` coefficients ``g_φ(features0)``."""
        return self.coef(features0)
