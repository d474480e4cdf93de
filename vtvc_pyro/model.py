"""The explicit Pyro model of VTVC (METHOD §2): spike-and-slab coefficients per sample, task and block, and a
likelihood through the composed encoder and each sample's own task head."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.nn import PyroModule
from torch import nn

from vtvc_pyro.heads import HeadBank
from vtvc_pyro.priors import PriorSpec, as_prior

Encoder = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NonFiniteError(FloatingPointError):
    """A NaN or infinity reached a sample site or a parameter; the message names it (and the SVI step)."""


def require_finite(value: torch.Tensor, what: str, *, allow_neg_inf: bool = False) -> torch.Tensor:
    """``value`` unchanged, or :class:`NonFiniteError` naming ``what`` when it holds NaN (or ±inf)."""
    bad = torch.isnan(value) | (value == float("inf"))
    if not allow_neg_inf:
        bad |= value == float("-inf")
    if bad.any():
        raise NonFiniteError(f"{what} has {int(bad.sum())} non-finite value(s) of {value.numel()}")
    return value


def require_finite_params(module: nn.Module, sites: str) -> None:
    """:class:`NonFiniteError` naming the first parameter of ``module`` (and the ``sites`` it feeds) that
    holds a NaN or infinity: the one check every guide and baseline runs on its parameters."""
    for name, param in module.named_parameters():
        require_finite(param.detach(), f"{sites}: parameter {name!r}")


@contextlib.contextmanager
def own_params() -> Iterator[None]:
    """Run PyroModules on the parameters they hold (a fresh param-store scope): evaluation then never picks
    up another fit's parameters stored under the same names. Also a decorator."""
    with pyro.get_param_store().scope():
        yield


@dataclass
class Batch:
    """A mini-batch as model and guide see it: dataset positions (the ``data`` plate's subsample), images,
    cached pre-trained features ``normalize(f(x; θ0))``, labels (``None`` to predict), task ids."""

    index: torch.Tensor  # [n] long
    images: torch.Tensor  # [n, ...]
    features0: torch.Tensor  # [n, D]
    labels: torch.Tensor | None  # [n] long
    task: torch.Tensor  # [n] long, indexes the heads
    num_data: int

    def __post_init__(self) -> None:
        n = self.index.shape[0]
        named = {"images": self.images, "features0": self.features0, "task": self.task}
        if self.labels is not None:
            named["labels"] = self.labels
        for name, value in named.items():
            if value.shape[0] != n:
                raise ValueError(f"Batch.{name} has {value.shape[0]} rows but index has {n}")
        if self.features0.ndim != 2:
            raise ValueError(f"Batch.features0 must be [n, D], got shape {tuple(self.features0.shape)}")
        if not 0 < n <= self.num_data:
            raise ValueError(f"Batch of {n} samples from num_data={self.num_data}")


class FrozenNetworks:
    """The frozen composed encoder and task heads, in a plain container: never a ``PyroModule`` attribute, so
    nothing of them reaches Pyro's param store or an optimizer."""

    def __init__(self, encoder: Encoder, heads: HeadBank, num_tasks: int, num_blocks: int):
        self.encoder = encoder
        self.heads = heads
        self.num_tasks = num_tasks
        self.num_blocks = num_blocks

    def logits(self, images: torch.Tensor, task: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """``[n, C_max]`` logits of each sample's own task head on ``f(x_n; θ(coef_n))``."""
        return self.heads.logits(self.encoder(images, coef), task)

    @torch.no_grad()
    def features0(self, images: torch.Tensor) -> torch.Tensor:
        """``normalize(f(x; θ0))``: the encoder at all-zero coefficients."""
        zeros = torch.zeros(images.shape[0], self.num_tasks, self.num_blocks, device=images.device)
        return F.normalize(require_finite(self.encoder(images, zeros), "pre-trained features"), dim=-1)


def plates(batch: Batch, num_tasks: int, num_blocks: int) -> tuple[pyro.plate, pyro.plate, pyro.plate]:
    """The ``data`` (subsampled, scaled by N / n), ``tasks`` and ``blocks`` plates: latent sites are
    ``[n, T, B]``, per-sample sites ``[n, 1, 1]``."""
    data = pyro.plate("data", batch.num_data, subsample=batch.index, dim=-3)
    return data, pyro.plate("tasks", num_tasks, dim=-2), pyro.plate("blocks", num_blocks, dim=-1)


def observe(frozen: FrozenNetworks, batch: Batch, coef: torch.Tensor) -> torch.Tensor:
    """The likelihood site ``obs ~ Categorical(logits = head_task(n)(f(x_n; θ(coef_n))))``, inside the data
    plate; returns the ``[n, C_max]`` logits."""
    logits = frozen.logits(batch.images, batch.task, coef)
    require_finite(logits, "site 'obs': the logits (composed encoder, then task heads)", allow_neg_inf=True)
    labels = None if batch.labels is None else batch.labels[:, None, None]
    pyro.sample("obs", dist.Categorical(logits=logits[:, None, None, :]), obs=labels)
    return logits


class VTVCModel(PyroModule):
    """Variational Task Vector Composition, the generative story (METHOD §2). For every sample ``n``,
    task ``t`` and block ``b``::

        pi[t, b]      ~ Beta(a, b)                  (only with a hyper-prior; else pi is fixed)
        gate[n, t, b] ~ Bernoulli(pi[t, b])         (spike; RelaxedBernoulli if relaxed; none if gaussian)
        slab[n, t, b] ~ Normal(m[t, b], s[t, b])    (slab)
        coef[n, t, b] = gate · slab                 (deterministic)
        obs[n]        ~ Categorical(logits = κ · H_task(n) · normalize(f(x_n; θ0 + Σ coef[n, t, b] τ_t^(b))))

    The encoder ``encoder(images, coef [n, T, B]) -> features [n, D]`` and the heads are frozen and kept
    out of Pyro. ``kl_scale`` scales the latent sites (KL annealing, with the same argument to the guide).
    """

    def __init__(self, encoder: Encoder, heads: HeadBank, prior: PriorSpec | Mapping[str, Any] | None,
                 task_names: Sequence[str], block_names: Sequence[str]):
        super().__init__()
        self.prior = as_prior(prior)
        self.task_names, self.block_names = list(task_names), list(block_names)
        self.frozen = FrozenNetworks(encoder, heads, len(self.task_names), len(self.block_names))
        for key, value in self.prior.resolve(self.task_names, self.block_names).items():
            self.register_buffer(f"prior_{key}", value)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    def prior_params(self) -> dict[str, torch.Tensor]:
        """The resolved ``[T, B]`` prior tensors (``pi``, ``slab_loc``, ``slab_scale``, ...)."""
        return {name[len("prior_"):]: buf for name, buf in self.named_buffers() if name.startswith("prior_")}

    def pi_dist(self) -> dist.Beta:
        return self.prior.pi_dist(self.prior_params())

    def gate_dist(self, pi: torch.Tensor | None = None) -> dist.Bernoulli | dist.RelaxedBernoulli:
        return self.prior.gate_dist(self.prior_params(), pi)

    def slab_dist(self) -> dist.Normal:
        return self.prior.slab_dist(self.prior_params())

    def forward(self, batch: Batch, kl_scale: float = 1.0) -> torch.Tensor:
        data, tasks, blocks = plates(batch, self.num_tasks, self.num_blocks)
        pi = gate = None
        with poutine.scale(scale=kl_scale):
            if self.prior.hierarchical:
                with tasks, blocks:
                    pi = pyro.sample("pi", self.pi_dist())
            with data, tasks, blocks:
                if self.prior.has_spike:
                    gate = pyro.sample("gate", self.gate_dist(pi))
                slab = pyro.sample("slab", self.slab_dist())
        with data:
            with tasks, blocks:
                coef = pyro.deterministic("coef", slab if gate is None else gate * slab)
            return observe(self.frozen, batch, coef)
