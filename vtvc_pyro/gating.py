"""Gated sampling (METHOD §4): a deterministic keep/drop decision from the posterior's importance and
uncertainty, replacing the random gate draw. A rule is any function ``(logits, loc, scale) -> gate`` whose
forward value is exactly 0/1; :class:`ImportanceUncertaintyGate` is the default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

GateRule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ImportanceUncertaintyGate:
    """Keep a component when it is likely included and its coefficient is large relative to its uncertainty::

        u = tanh(σ / (|μ| + ε)),   τ = τ0 · (1 + β · u)
        G = 1[sigmoid(ℓ) ≥ 0.5] · 1[|μ| ≥ τ]                  (hard gate: the forward value)
        G̃ = sigmoid(ℓ) · sigmoid(k · (|μ| − τ))               (soft gate: the gradient)
        gate = G + (G̃ − G̃.detach())
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

    def hard(self, logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``G`` as 0./1. floats."""
        keep = (torch.sigmoid(logits) >= 0.5) & (loc.abs() >= self.threshold(loc, scale))
        return keep.to(loc.dtype)

    def soft(self, logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``G̃``, differentiable in all three inputs."""
        margin = loc.abs() - self.threshold(loc, scale)
        return torch.sigmoid(logits) * torch.sigmoid(self.sharpness * margin)

    def __call__(self, logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        soft = self.soft(logits, loc, scale)
        return self.hard(logits, loc, scale) + (soft - soft.detach())
