"""The guide's gate and slab distributions, and their analytic KL divergences to the prior (METHOD §5).

With the gating filter ``F`` (0/1 forward, straight-through gradient) and ``p = sigmoid(ℓ)``, the gate is
``q(gate) = Bernoulli(p_eff)``, ``p_eff = p · F``. Registered with ``torch.distributions.kl.register_kl``, so
``TraceMeanField_ELBO`` uses them:

    KL(q(gate) ‖ Bernoulli(π))             = F · KL(Bern(p) ‖ Bern(π)) + (1 − F) · (−log(1 − π))
    E_q(gate) KL(q(slab | gate) ‖ N(m, s))  = p_eff · KL(N(μ, σ) ‖ N(m, s))

For a 0/1 filter the first line is exactly ``KL(Bern(p_eff) ‖ Bern(π))``; written linear in ``F`` its
straight-through gradient is finite (``KL(Bern(q) ‖ ·)`` has an infinite slope at ``q = 0``). Both are
differentiable in the guide's ``logits``, ``loc`` and ``scale``.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.torch_distribution import TorchDistribution
from torch.distributions import constraints, kl_divergence, register_kl
from torch.distributions.utils import broadcast_all, lazy_property

_EMPTY = torch.Size()


class GateBernoulli(TorchDistribution):
    """``q(gate) = Bernoulli(sigmoid(logits) · keep)``, reparameterised draws ``keep · z``.

    ``z`` is a relaxed straight-through sample (exact 0/1 forward, gradient of
    ``RelaxedBernoulli(temperature, logits)``); ``keep`` is the gating filter's ``F_st`` (all ones: no
    filter). ``log_prob`` is the mass of the 0/1 value, ``keep · log Bern(value; p)`` (and ``−inf`` for a 1
    where ``keep`` is 0), so ``Trace_ELBO``'s ``log q − log p`` is an unbiased estimate of the registered KL.
    """

    arg_constraints = {"logits": constraints.real}
    support = constraints.boolean
    has_rsample = True

    def __init__(self, logits: torch.Tensor, temperature: float = 0.5, keep: torch.Tensor | None = None,
                 validate_args: bool | None = None):
        self.logits = logits
        self.temperature = float(temperature)
        self.keep = torch.ones_like(logits) if keep is None else keep.expand(logits.shape)
        super().__init__(logits.shape, validate_args=validate_args)

    @lazy_property
    def probs(self) -> torch.Tensor:
        """``p_eff = sigmoid(logits) · keep``."""
        return torch.sigmoid(self.logits) * self.keep

    @property
    def mean(self) -> torch.Tensor:
        return self.probs

    def expand(self, batch_shape: torch.Size, _instance: GateBernoulli | None = None) -> GateBernoulli:
        new = self._get_checked_instance(GateBernoulli, _instance)
        batch_shape = torch.Size(batch_shape)
        new.logits = self.logits.expand(batch_shape)
        new.temperature = self.temperature
        new.keep = self.keep.expand(batch_shape)
        super(GateBernoulli, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape: torch.Size = _EMPTY) -> torch.Tensor:
        temperature = torch.tensor(self.temperature, dtype=self.logits.dtype, device=self.logits.device)
        draw = dist.RelaxedBernoulliStraightThrough(temperature, logits=self.logits).rsample(sample_shape)
        return self.keep * draw

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits, keep, value = broadcast_all(self.logits, self.keep, value)
        on = -F.binary_cross_entropy_with_logits(logits, value, reduction="none")
        return torch.where((value > 0) & (keep == 0), float("-inf"), keep * on)


class SlabNormal(dist.Normal):
    """``q(slab | gate)``: ``Normal(loc, scale)`` where the gate is on, the prior where it is off.

    Draws always come from ``Normal(loc, scale)``: where the gate is off the slab's value never reaches
    ``coef = gate · slab``, so this represents the same family, and a straight-through gate gradient
    (``∂coef/∂gate = slab``) asks what the coefficient would do if switched on. ``log_prob`` is the family's
    density (``gate · log N(loc, scale) + (1 − gate) · log prior``), so under ``Trace_ELBO`` an unused slab
    costs no KL; averaged over the gate the KL is ``inclusion · KL(N(loc, scale) ‖ prior)`` (registered
    below), ``inclusion`` being the gate's ``p_eff``.
    """

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, inclusion: torch.Tensor, gate: torch.Tensor,
                 prior_loc: torch.Tensor, prior_scale: torch.Tensor, validate_args: bool | None = None):
        super().__init__(loc, scale, validate_args=validate_args)
        shape = self.batch_shape
        self.inclusion, self.gate = inclusion.expand(shape), gate.expand(shape)
        self.prior = dist.Normal(prior_loc.expand(shape), prior_scale.expand(shape), validate_args=False)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.gate * super().log_prob(value) + (1 - self.gate) * self.prior.log_prob(value)

    def expand(self, batch_shape: torch.Size, _instance: SlabNormal | None = None) -> SlabNormal:
        shape = torch.Size(batch_shape)
        prior = self.prior.expand(shape)
        return SlabNormal(self.loc.expand(shape), self.scale.expand(shape), self.inclusion.expand(shape),
                          self.gate.expand(shape), prior.loc, prior.scale, validate_args=False)


@register_kl(GateBernoulli, torch.distributions.Bernoulli)
def _kl_gate_bernoulli(q: GateBernoulli, p: torch.distributions.Bernoulli) -> torch.Tensor:
    included = kl_divergence(torch.distributions.Bernoulli(logits=q.logits), p)
    return q.keep * included - (1 - q.keep) * torch.log1p(-p.probs)


@register_kl(SlabNormal, torch.distributions.Normal)
def _kl_slab_normal(q: SlabNormal, p: torch.distributions.Normal) -> torch.Tensor:
    slab = torch.distributions.Normal(q.loc, q.scale, validate_args=False)
    return q.inclusion * kl_divergence(slab, p)
