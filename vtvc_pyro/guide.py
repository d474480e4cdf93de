"""The variational family (METHOD §3–4): an amortized guide on the frozen pre-trained features, and the
task-level (non-amortized) ablation. Both sample ``pi`` (hyper-prior only), ``gate`` (spike only) and
``slab``, with gated sampling: ``gate = F_st · z`` (:mod:`vtvc_pyro.gating`), so
``q(gate) = Bernoulli(p · F)``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam
from torch import nn

from vtvc_pyro.gating import GateFilter, ImportanceUncertaintyFilter
from vtvc_pyro.kl import GateBernoulli, SlabNormal
from vtvc_pyro.model import Batch, own_params, plates, require_finite, require_finite_params
from vtvc_pyro.priors import PriorSpec, as_prior

GATED, UNGATED = "gated", "ungated"
GATINGS = (GATED, UNGATED)  # the default (METHOD §4) and the ablation without a filter (F ≡ 1)
LOGIT_LIMIT = 10.0  # gate logits are clamped to [-10, 10]: inclusion probabilities within 5e-5 of 0 and 1
MIN_SCALE = 1e-4


def amortizer(feature_dim: int, num_outputs: int, hidden_dim: int | None = None) -> PyroModule:
    """``g_φ``: ``Linear(d, d/4) – ReLU – Linear(d/4, num_outputs)`` as a PyroModule (its weights are guide
    parameters in Pyro's param store)."""
    hidden = hidden_dim or max(1, feature_dim // 4)
    return PyroModule[nn.Sequential](
        PyroModule[nn.Linear](feature_dim, hidden), nn.ReLU(), PyroModule[nn.Linear](hidden, num_outputs)
    )


def _rho(scale: float) -> float:
    """The softplus pre-image ``ρ`` with ``softplus(ρ) + MIN_SCALE = scale``."""
    if not scale > MIN_SCALE:
        raise ValueError(f"init_scale: must be > {MIN_SCALE}, got {scale!r}")
    return math.log(math.expm1(scale - MIN_SCALE))


def _logit(prob: float) -> float:
    if not 0 < prob < 1:
        raise ValueError(f"init_prob: must be in (0, 1), got {prob!r}")
    return math.log(prob / (1 - prob))


class GateSlabGuide(PyroModule):
    """What both guides share: the site structure and distributions; subclasses give ``(logits, loc, scale)``.

    ``q(gate) = Bernoulli(p_eff)``, ``p_eff = sigmoid(ℓ) · F``, drawn as ``F_st · z`` with ``z`` a relaxed
    straight-through sample and ``F`` the gating filter (``gating="gated"``; ``F ≡ 1`` for ``"ungated"``);
    ``q(slab | gate) = Normal(μ, σ)`` where the gate is on, the prior where it is off
    (:class:`~vtvc_pyro.kl.SlabNormal`); ``q(pi) = Beta(α, β)`` with free ``[T, B]`` parameters.
    """

    def __init__(self, task_names: Sequence[str], block_names: Sequence[str],
                 prior: PriorSpec | Mapping[str, Any] | None = None, *, gating: str = GATED,
                 gate_filter: GateFilter | None = None, temperature: float = 0.5):
        super().__init__()
        self.prior = as_prior(prior)
        if gating not in GATINGS:
            raise ValueError(f"gating: {gating!r} is not a gating mode; allowed: {', '.join(GATINGS)}")
        if gating == GATED and self.prior.relaxed:
            raise ValueError(f"gating: a relaxed spike needs gating={UNGATED!r} (a filtered gate is exactly "
                             "0, where the relaxed density is degenerate)")
        if not temperature > 0:
            raise ValueError(f"temperature: must be > 0, got {temperature!r}")
        self.gating, self.temperature = gating, float(temperature)
        self.gate_filter = gate_filter or ImportanceUncertaintyFilter()
        self.task_names, self.block_names = list(task_names), list(block_names)
        params = self.prior.resolve(self.task_names, self.block_names)
        self.register_buffer("prior_slab_loc", params["slab_loc"])
        self.register_buffer("prior_slab_scale", params["slab_scale"])
        if self.prior.hierarchical:
            self.pi_alpha = PyroParam(params["pi_a"], constraint=constraints.positive)
            self.pi_beta = PyroParam(params["pi_b"], constraint=constraints.positive)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    def _components(self, features0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def components(self, features0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[n, T, B]`` gate logits ``ℓ``, slab loc ``μ`` and slab scale ``σ`` for ``[n, D]`` features;
        :class:`~vtvc_pyro.model.NonFiniteError` naming the parameter or output that holds a NaN/inf."""
        logits, loc, scale = self._components(features0)
        require_finite_params(self, "sites 'gate', 'slab'")
        for name, value in (("logits", logits), ("loc", loc), ("scale", scale)):
            require_finite(value, f"sites 'gate', 'slab': the guide's {name}")
        return logits, loc, scale

    def keep(self, logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The filter ``F_st`` (0/1 forward, straight-through gradient); all ones when ungated."""
        if self.gating == UNGATED:
            return torch.ones_like(loc)
        return self.gate_filter(logits, loc, scale)

    def pi_dist(self) -> dist.Beta:
        return dist.Beta(self.pi_alpha, self.pi_beta)

    def gate_dist(self, logits: torch.Tensor, keep: torch.Tensor) -> GateBernoulli | dist.RelaxedBernoulli:
        if self.prior.relaxed:
            temperature = torch.tensor(self.temperature, dtype=logits.dtype, device=logits.device)
            return dist.RelaxedBernoulli(temperature, logits=logits)
        return GateBernoulli(logits, self.temperature, keep)

    def slab_dist(self, loc: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor | None,
                  inclusion: torch.Tensor) -> dist.Normal:
        if gate is None or self.prior.relaxed:
            return dist.Normal(loc, scale)
        return SlabNormal(loc, scale, inclusion, gate, self.prior_slab_loc, self.prior_slab_scale)

    def forward(self, batch: Batch, kl_scale: float = 1.0) -> None:
        logits, loc, scale = self.components(batch.features0)
        data, tasks, blocks = plates(batch, self.num_tasks, self.num_blocks)
        gate = inclusion = None
        with poutine.scale(scale=kl_scale):
            if self.prior.hierarchical:
                with tasks, blocks:
                    pyro.sample("pi", self.pi_dist())
            with data, tasks, blocks:
                if self.prior.has_spike:
                    keep = self.keep(logits, loc, scale)
                    gate = pyro.sample("gate", self.gate_dist(logits, keep))
                    inclusion = torch.sigmoid(logits) * keep
                pyro.sample("slab", self.slab_dist(loc, scale, gate, inclusion))

    def effective_inclusion(self, logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor
                            ) -> torch.Tensor:
        """``p_eff = sigmoid(ℓ) · F`` (forward values), all ones without a spike."""
        if not self.prior.has_spike:
            return torch.ones_like(loc)
        return torch.sigmoid(logits) * self.keep(logits, loc, scale).detach()

    def decide(self, logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The 0/1 evaluation gate ``1[p_eff ≥ 0.5]`` for given components."""
        return (self.effective_inclusion(logits, loc, scale) >= 0.5).to(loc.dtype)

    @torch.no_grad()
    @own_params()
    def inclusion(self, features0: torch.Tensor) -> torch.Tensor:
        """``[n, T, B]`` effective inclusion probabilities ``p_eff`` (what ``q(gate)`` draws with)."""
        return self.effective_inclusion(*self.components(features0))

    @torch.no_grad()
    @own_params()
    def decision(self, features0: torch.Tensor) -> torch.Tensor:
        """``[n, T, B]`` 0/1 gate used at evaluation: ``1[p_eff ≥ 0.5]``, all ones without a spike."""
        return self.decide(*self.components(features0))

    @torch.no_grad()
    @own_params()
    def point_coef(self, features0: torch.Tensor) -> torch.Tensor:
        """The deterministic evaluation coefficients ``1[p_eff ≥ 0.5] · μ`` (METHOD §7), ``[n, T, B]``."""
        logits, loc, scale = self.components(features0)
        return self.decide(logits, loc, scale) * loc


class AmortizedGuide(GateSlabGuide):
    """Sample-specific posterior from ``g_φ(normalize(f(x; θ0)))`` → ``(ℓ, μ, ρ)`` per (task, block),
    ``σ = softplus(ρ) + 1e-4``. Initialised to ``p = init_prob``, ``μ = init_loc``, ``σ = init_scale`` with a
    small input dependence, so fitting starts near task arithmetic."""

    def __init__(self, feature_dim: int, task_names: Sequence[str], block_names: Sequence[str],
                 prior: PriorSpec | Mapping[str, Any] | None = None, *, hidden_dim: int | None = None,
                 gating: str = GATED, gate_filter: GateFilter | None = None, temperature: float = 0.5,
                 init_loc: float = 0.3, init_scale: float = 0.05, init_prob: float = 0.7,
                 init_weight_scale: float = 0.01):
        super().__init__(task_names, block_names, prior, gating=gating, gate_filter=gate_filter,
                         temperature=temperature)
        self.feature_dim = feature_dim
        components = self.num_tasks * self.num_blocks
        self.net = amortizer(feature_dim, 3 * components, hidden_dim)
        last = self.net[-1]
        with torch.no_grad():
            last.weight.mul_(init_weight_scale)
            start = torch.tensor([_logit(init_prob), float(init_loc), _rho(init_scale)])
            last.bias.copy_(start.repeat_interleave(components))

    def _components(self, features0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if features0.ndim != 2 or features0.shape[1] != self.feature_dim:
            raise ValueError(f"features0 must be [n, {self.feature_dim}], got shape {tuple(features0.shape)}")
        logits, loc, rho = self.net(features0).view(-1, 3, self.num_tasks, self.num_blocks).unbind(1)
        return logits.clamp(-LOGIT_LIMIT, LOGIT_LIMIT), loc, F.softplus(rho) + MIN_SCALE


class TaskLevelGuide(GateSlabGuide):
    """The non-amortized ablation: free ``[T, B]`` parameters ``ℓ, μ, ρ`` shared by every sample."""

    def __init__(self, task_names: Sequence[str], block_names: Sequence[str],
                 prior: PriorSpec | Mapping[str, Any] | None = None, *, gating: str = GATED,
                 gate_filter: GateFilter | None = None, temperature: float = 0.5, init_loc: float = 0.3,
                 init_scale: float = 0.05, init_prob: float = 0.7):
        super().__init__(task_names, block_names, prior, gating=gating, gate_filter=gate_filter,
                         temperature=temperature)
        shape = (self.num_tasks, self.num_blocks)
        self.gate_logits = nn.Parameter(torch.full(shape, _logit(init_prob)))
        self.slab_loc = nn.Parameter(torch.full(shape, float(init_loc)))
        self.slab_rho = nn.Parameter(torch.full(shape, _rho(init_scale)))

    def _components(self, features0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shape = (features0.shape[0], self.num_tasks, self.num_blocks)
        logits = self.gate_logits.clamp(-LOGIT_LIMIT, LOGIT_LIMIT).expand(shape)
        return logits, self.slab_loc.expand(shape), (F.softplus(self.slab_rho) + MIN_SCALE).expand(shape)


GUIDE_KINDS = ("amortized", "task_level")


@dataclass(frozen=True)
class GuideConfig:
    """The guide's settings (METHOD §3–4), one default per knob; ``build_guide`` turns it into a guide.

    ``kind``: the amortized ``g_φ`` or the task-level ablation; ``gating``: one of :data:`GATINGS`;
    ``tau0, beta, sharpness``: the gating filter; ``init_*``: the starting posterior.
    """

    kind: str = "amortized"
    hidden_dim: int | None = None
    gating: str = GATED
    tau0: float = 0.05
    beta: float = 1.0
    sharpness: float = 20.0
    temperature: float = 0.5
    init_loc: float = 0.3
    init_scale: float = 0.05
    init_prob: float = 0.7

    def __post_init__(self) -> None:
        if self.kind not in GUIDE_KINDS:
            raise ValueError(f"guide.kind: {self.kind!r} is not a guide; allowed: {', '.join(GUIDE_KINDS)}")
        if self.gating not in GATINGS:
            raise ValueError(f"guide.gating: {self.gating!r} is not a gating mode; "
                             f"allowed: {', '.join(GATINGS)}")
        if self.hidden_dim is not None and not (isinstance(self.hidden_dim, int) and self.hidden_dim > 0):
            raise ValueError(f"guide.hidden_dim: must be a positive integer or null, got {self.hidden_dim!r}")
        for name in ("tau0", "beta"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"guide.{name}: must be a finite number >= 0, got {getattr(self, name)!r}")
        for name in ("sharpness", "temperature"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"guide.{name}: must be a finite number > 0, got {getattr(self, name)!r}")
        if not math.isfinite(self.init_loc):
            raise ValueError(f"guide.init_loc: must be finite, got {self.init_loc!r}")
        if not (math.isfinite(self.init_scale) and self.init_scale > MIN_SCALE):
            raise ValueError(f"guide.init_scale: must be > {MIN_SCALE}, got {self.init_scale!r}")
        if not 0 < self.init_prob < 1:
            raise ValueError(f"guide.init_prob: must be in (0, 1), got {self.init_prob!r}")

    def gate_filter(self) -> ImportanceUncertaintyFilter:
        return ImportanceUncertaintyFilter(tau0=self.tau0, beta=self.beta, sharpness=self.sharpness)


def build_guide(config: GuideConfig, feature_dim: int, task_names: Sequence[str], block_names: Sequence[str],
                prior: PriorSpec | Mapping[str, Any] | None = None, *, gating: str | None = None
                ) -> GateSlabGuide:
    """The guide ``config`` describes (``gating`` overrides the config's mode, for the ablation methods)."""
    common = {"prior": prior, "gating": gating or config.gating, "gate_filter": config.gate_filter(),
              "temperature": config.temperature, "init_loc": config.init_loc,
              "init_scale": config.init_scale, "init_prob": config.init_prob}
    if config.kind == "amortized":
        return AmortizedGuide(feature_dim, task_names, block_names, hidden_dim=config.hidden_dim, **common)
    return TaskLevelGuide(task_names, block_names, **common)
