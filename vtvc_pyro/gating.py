"""Gated sampling (METHOD §4): a deterministic filter ``F(ℓ, μ, σ)`` that removes unimportant or unreliable
components before anything is sampled for them. The guide's gate is ``F_st · z`` with ``z`` a relaxed
Bernoulli straight-through draw, so ``q(gate) = Bernoulli(p · F)``.

A filter is any function ``(logits, loc, scale) -> F_st`` whose forward value is exactly 0/1 (its gradient
is the filter's surrogate); :class:`ImportanceUncertaintyFilter` is the default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

GateFilter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ImportanceUncertaintyFilter:
    """Keep a component when its coefficient is large relative to its uncertainty::

        u = tanh(σ / (|μ| + ε)),   τ = τ0 · (1 + β · u)
        F = 1[|μ| ≥ τ]                     (the forward value)
        F̃ = sigmoid(k · (|μ| − τ))         (the gradient)
        F_st = F + (F̃ − F̃.detach())
    """

    tau0: float = 0.05
    beta: float = 1.0
    sharpness: float = 20.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("tau0", "beta", "eps"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"gating.{name}: must be >= 0, got {getattr(self, name)!r}")
        if not self.sharpness > 0:
            raise ValueError(f"gating.sharpness: must be > 0, got {self.sharpness!r}")

    def threshold(self, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``τ = τ0 · (1 + β · tanh(σ / (|μ| + ε)))``."""
        return self.tau0 * (1 + self.beta * torch.tanh(scale / (loc.abs() + self.eps)))

    def hard(self, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``F`` as 0./1. floats."""
        return (loc.abs() >= self.threshold(loc, scale)).to(loc.dtype)

    def soft(self, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``F̃``, differentiable in ``loc`` and ``scale``."""
        return torch.sigmoid(self.sharpness * (loc.abs() - self.threshold(loc, scale)))

    def __call__(self, logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        soft = self.soft(loc, scale)
        return self.hard(loc, scale) + (soft - soft.detach())
