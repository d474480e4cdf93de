"""Declarative priors (METHOD §2): small frozen dataclasses, or the equivalent plain mapping of a YAML config.

```yaml
prior:
  kind: spike_and_slab          # or gaussian (no spike: the ablation)
  pi: 0.5                       # Bernoulli inclusion probability of the spike
  slab: {loc: 0.0, scale: 1.0}
  temperature: null             # a number: relaxed spike RelaxedBernoulli(temperature, pi)
  pi_prior: null                # {a: 1, b: 1}: Beta(a, b) hyper-prior on pi
  overrides:                    # later entries win; fnmatch patterns on task and block names
    - {tasks: mnist, blocks: "transformer.resblocks.*", pi: 0.9}
    - {blocks: conv1.weight, slab: {scale: 0.1}}
```

A spec resolves to ``[T, B]`` tensors for given task and block names, and from those to the Pyro
distributions of the sites ``pi`` (only with a hyper-prior), ``gate`` (only with a spike) and ``slab``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyro.distributions as dist
import torch

KINDS = ("spike_and_slab", "gaussian")


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _check_keys(mapping: Mapping[str, Any], cls: type, where: str) -> None:
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(mapping).__name__}")
    unknown = sorted(set(mapping) - set(_fields(cls)))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown field; allowed: {', '.join(_fields(cls))}")


def _number(value: Any, where: str, *, low: float | None = None, high: float | None = None) -> float:
    """``value`` as a float, required finite and inside the open interval ``(low, high)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    if (low is not None and value <= low) or (high is not None and value >= high):
        raise ValueError(f"{where}: {value!r} is outside ({'-inf' if low is None else low}, "
                         f"{'inf' if high is None else high})")
    return float(value)


@dataclass(frozen=True)
class NormalSpec:
    """The slab ``Normal(loc, scale)``."""

    loc: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        _number(self.loc, "slab.loc")
        _number(self.scale, "slab.scale", low=0.0)


@dataclass(frozen=True)
class BetaSpec:
    """A ``Beta(a, b)`` hyper-prior on the inclusion probability ``pi``."""

    a: float = 1.0
    b: float = 1.0

    def __post_init__(self) -> None:
        _number(self.a, "pi_prior.a", low=0.0)
        _number(self.b, "pi_prior.b", low=0.0)


@dataclass(frozen=True)
class PriorOverride:
    """Replaces some prior values on the (task, block) components matched by both patterns."""

    tasks: str | tuple[str, ...] = "*"
    blocks: str | tuple[str, ...] = "*"
    pi: float | None = None
    slab_loc: float | None = None
    slab_scale: float | None = None
    pi_prior: BetaSpec | None = None

    def __post_init__(self) -> None:
        if self.pi is not None:
            _number(self.pi, "overrides.pi", low=0.0, high=1.0)
        if self.slab_loc is not None:
            _number(self.slab_loc, "overrides.slab.loc")
        if self.slab_scale is not None:
            _number(self.slab_scale, "overrides.slab.scale", low=0.0)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], where: str = "overrides") -> PriorOverride:
        allowed = ("tasks", "blocks", "pi", "slab", "pi_prior")
        if not isinstance(mapping, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {type(mapping).__name__}")
        unknown = sorted(set(mapping) - set(allowed))
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: unknown field; allowed: {', '.join(allowed)}")
        slab = dict(mapping.get("slab") or {})
        _check_keys(slab, NormalSpec, f"{where}.slab")
        pi_prior = mapping.get("pi_prior")
        if pi_prior is not None:
            _check_keys(pi_prior, BetaSpec, f"{where}.pi_prior")
            pi_prior = BetaSpec(**pi_prior)
        patterns = {k: mapping.get(k, "*") for k in ("tasks", "blocks")}
        for key, value in patterns.items():
            if isinstance(value, Sequence) and not isinstance(value, str):
                patterns[key] = tuple(value)
        return cls(pi=mapping.get("pi"), slab_loc=slab.get("loc"), slab_scale=slab.get("scale"),
                   pi_prior=pi_prior, **patterns)

    def mask(self, task_names: Sequence[str], block_names: Sequence[str]) -> torch.Tensor:
        """``[T, B]`` bool: the components this override applies to."""

        def matches(names: Sequence[str], patterns: str | tuple[str, ...]) -> torch.Tensor:
            patterns = (patterns,) if isinstance(patterns, str) else patterns
            return torch.tensor([any(fnmatch.fnmatchcase(n, p) for p in patterns) for n in names])

        return matches(task_names, self.tasks)[:, None] & matches(block_names, self.blocks)[None, :]


@dataclass(frozen=True)
class PriorSpec:
    """The prior of the coefficients: ``gate ~ Bernoulli(pi)`` (or relaxed), ``slab ~ Normal(loc, scale)``."""

    kind: str = "spike_and_slab"
    pi: float = 0.5
    slab: NormalSpec = field(default_factory=NormalSpec)
    temperature: float | None = None
    pi_prior: BetaSpec | None = None
    overrides: tuple[PriorOverride, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: {self.kind!r} is not a prior kind; allowed: {', '.join(KINDS)}")
        _number(self.pi, "pi", low=0.0, high=1.0)
        if self.temperature is not None:
            _number(self.temperature, "temperature", low=0.0)
        if self.kind == "gaussian":
            spike = [name for name in ("temperature", "pi_prior") if getattr(self, name) is not None]
            spike += [f"overrides[{i}].pi" for i, o in enumerate(self.overrides) if o.pi is not None]
            if spike:
                raise ValueError(f"{spike[0]}: a gaussian prior has no spike; remove it or use "
                                 "spike_and_slab")
        if self.pi_prior is not None and self.pi != PriorSpec.pi:
            raise ValueError(f"pi: {self.pi!r} is unused: pi is latent under pi_prior (Beta(a, b)); "
                             "remove pi or set pi_prior: null")
        for i, o in enumerate(self.overrides):
            if o.pi_prior is not None and self.pi_prior is None:
                raise ValueError(f"overrides[{i}].pi_prior: needs a global prior.pi_prior to override")
            if o.pi is not None and self.pi_prior is not None:
                raise ValueError(f"overrides[{i}].pi: pi is latent under pi_prior; override pi_prior instead")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | PriorSpec) -> PriorSpec:
        """A spec from a config mapping; unknown or malformed fields raise, naming the field."""
        if isinstance(mapping, PriorSpec):
            return mapping
        _check_keys(mapping, cls, "prior")
        values = dict(mapping)
        if "slab" in values:
            _check_keys(values["slab"], NormalSpec, "prior.slab")
            values["slab"] = NormalSpec(**values["slab"])
        if values.get("pi_prior") is not None:
            _check_keys(values["pi_prior"], BetaSpec, "prior.pi_prior")
            values["pi_prior"] = BetaSpec(**values["pi_prior"])
        values["overrides"] = tuple(
            PriorOverride.from_mapping(o, f"prior.overrides[{i}]")
            for i, o in enumerate(values.get("overrides") or ())
        )
        return cls(**values)

    def to_mapping(self) -> dict[str, Any]:
        """The plain mapping :meth:`from_mapping` reads back."""
        pi_prior = None if self.pi_prior is None else dataclasses.asdict(self.pi_prior)
        out: dict[str, Any] = {"kind": self.kind, "pi": self.pi, "slab": dataclasses.asdict(self.slab),
                               "temperature": self.temperature, "pi_prior": pi_prior}
        out["overrides"] = []
        for o in self.overrides:
            entry: dict[str, Any] = {"tasks": o.tasks, "blocks": o.blocks}
            if o.pi is not None:
                entry["pi"] = o.pi
            slab = {k: v for k, v in (("loc", o.slab_loc), ("scale", o.slab_scale)) if v is not None}
            if slab:
                entry["slab"] = slab
            if o.pi_prior is not None:
                entry["pi_prior"] = dataclasses.asdict(o.pi_prior)
            out["overrides"].append(entry)
        return out

    def without_spike(self) -> PriorSpec:
        """The spike-free counterpart (the ``vtvc_gaussian`` ablation): the same slab and slab overrides."""
        overrides = tuple(PriorOverride(o.tasks, o.blocks, slab_loc=o.slab_loc, slab_scale=o.slab_scale)
                          for o in self.overrides if o.slab_loc is not None or o.slab_scale is not None)
        return PriorSpec(kind="gaussian", slab=self.slab, overrides=overrides)

    @property
    def has_spike(self) -> bool:
        return self.kind == "spike_and_slab"

    @property
    def relaxed(self) -> bool:
        return self.has_spike and self.temperature is not None

    @property
    def hierarchical(self) -> bool:
        """Whether ``pi`` is itself a latent site (a Beta hyper-prior)."""
        return self.pi_prior is not None

    def resolve(self, task_names: Sequence[str], block_names: Sequence[str]) -> dict[str, torch.Tensor]:
        """``[T, B]`` tensors ``pi``, ``slab_loc``, ``slab_scale`` (and ``pi_a``, ``pi_b`` when hierarchical),
        with the overrides applied in order."""
        shape = (len(task_names), len(block_names))
        if 0 in shape:
            raise ValueError(f"a prior needs at least one task and one block, got {shape}")
        beta = self.pi_prior or BetaSpec()
        out = {"pi": torch.full(shape, self.pi), "slab_loc": torch.full(shape, self.slab.loc),
               "slab_scale": torch.full(shape, self.slab.scale),
               "pi_a": torch.full(shape, beta.a), "pi_b": torch.full(shape, beta.b)}
        for i, o in enumerate(self.overrides):
            mask = o.mask(task_names, block_names)
            if not mask.any():
                raise ValueError(f"prior.overrides[{i}]: tasks={o.tasks!r}, blocks={o.blocks!r} match no "
                                 f"component; tasks are {list(task_names)}")
            for key, value in (("pi", o.pi), ("slab_loc", o.slab_loc), ("slab_scale", o.slab_scale)):
                if value is not None:
                    out[key][mask] = value
            if o.pi_prior is not None:
                out["pi_a"][mask], out["pi_b"][mask] = o.pi_prior.a, o.pi_prior.b
        if not self.hierarchical:
            del out["pi_a"], out["pi_b"]
        return out

    def pi_dist(self, params: Mapping[str, torch.Tensor]) -> dist.Beta:
        """``pi ~ Beta(a, b)`` (hierarchical priors only)."""
        return dist.Beta(params["pi_a"], params["pi_b"])

    def gate_dist(self, params: Mapping[str, torch.Tensor], pi: torch.Tensor | None = None
                  ) -> dist.Bernoulli | dist.RelaxedBernoulli:
        """``gate ~ Bernoulli(pi)`` or ``RelaxedBernoulli(temperature, pi)``; ``pi`` is the sampled one when
        hierarchical."""
        pi = params["pi"] if pi is None else pi
        if self.relaxed:
            return dist.RelaxedBernoulli(torch.as_tensor(self.temperature, dtype=pi.dtype, device=pi.device),
                                         probs=pi)
        return dist.Bernoulli(probs=pi)

    def slab_dist(self, params: Mapping[str, torch.Tensor]) -> dist.Normal:
        """``slab ~ Normal(loc, scale)``."""
        return dist.Normal(params["slab_loc"], params["slab_scale"])

    def distributions(self, task_names: Sequence[str], block_names: Sequence[str]) -> dict[str, Any]:
        """The prior of every latent site, batch shape ``[T, B]`` (``gate`` at the prior mean of ``pi``)."""
        params = self.resolve(task_names, block_names)
        out: dict[str, Any] = {}
        if self.hierarchical:
            out["pi"] = self.pi_dist(params)
            params = {**params, "pi": out["pi"].mean}
        if self.has_spike:
            out["gate"] = self.gate_dist(params)
        out["slab"] = self.slab_dist(params)
        return out


def as_prior(spec: PriorSpec | Mapping[str, Any] | None) -> PriorSpec:
    """A :class:`PriorSpec` from a spec, a mapping, or ``None`` (the METHOD defaults)."""
    return PriorSpec() if spec is None else PriorSpec.from_mapping(spec)
