"""The experiment schema: what a ``vtvc run`` config holds, as frozen dataclasses with defaults, checks
across keys, named method variants, and the config digest that identifies a run.

Every error names the offending key (``svi.stepz: unknown key; allowed: steps, lr, ...``). A config file may
start from another one with ``extends: other.yaml`` (path relative to the file); the child's keys win.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vtvc_pyro.experiment.typed_config import (
    KEY_PATTERN,
    ConfigError,
    build,
    check,
    parse_override,
    read_yaml_file,
    set_dotted,
    to_dict,
)
from vtvc_pyro.priors import PriorSpec

__all__ = ["ConfigError", "ExperimentConfig", "load_config", "parse_override", "variant_config"]

METHODS = (
    "zeroshot", "finetuned", "task_arithmetic", "ties", "atlas", "metanet",
    "vtvc_gaussian", "vtvc_stochastic", "vtvc", "vtvc_merged",
)
"""Built-in methods, in the order of the comparison table."""

FITTED_METHODS = ("task_arithmetic", "ties", "atlas", "metanet", "vtvc_gaussian", "vtvc_stochastic", "vtvc")
"""Methods whose settings a variant may change (``variants:``)."""

VARIANT_SECTIONS = (
    "prior", "guide", "svi", "baselines", "blocks", "protocol.alpha_grid", "protocol.ties_top_k",
)
"""The only keys a variant's ``set:`` may touch: the ones that change how a method is fitted."""

ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(21))

_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
_POSITIVE = check(lambda v: v > 0, "must be > 0")
_NON_NEGATIVE = check(lambda v: v >= 0, "must be >= 0")
_UNIT = check(lambda v: 0 < v <= 1, "must be in (0, 1]")
_OPTIONAL_POSITIVE = check(lambda v: v is None or v > 0, "must be > 0 or null")


@dataclass(frozen=True)
class ZooConfig:
    """Where the pre-trained encoder, task vectors, heads and data come from.

    Either an embedded ``preset`` ("default", "micro"), or real checkpoints: ``model`` (open_clip name),
    ``pretrained`` and ``finetuned`` ({task: path}) image-encoder files, the zero-shot heads (``heads``
    files, or built from the text tower of the full CLIP weights in ``clip``) and a ``data_root`` with the
    standard datasets (task names as in ``vtvc_pyro.standard_tasks``: MNIST, SVHN, ...).
    """

    preset: Literal["default", "micro"] | None = "default"
    cache_dir: str | None = None
    model: str | None = None
    pretrained: str | None = None
    finetuned: dict[str, str] = field(default_factory=dict)
    clip: str | None = None
    """Full CLIP weights (text tower included) to build the zero-shot heads from."""
    heads: dict[str, str] = field(default_factory=dict)
    """Ready-made head files ({task: path}, ``ClassificationHead.save`` format); used instead of ``clip``."""
    trust_pickle: bool = False
    data_root: str | None = None
    tasks: tuple[str, ...] | None = None
    """Use only these tasks (in this order); null = every task of the zoo."""


@dataclass(frozen=True)
class ProtocolConfig:
    """Task addition (one composition for all tasks) or knowledge transfer (compose the other tasks)."""

    name: Literal["task_addition", "knowledge_transfer"] = "task_addition"
    targets: tuple[str, ...] | None = None
    """Knowledge-transfer target tasks; null = every task."""
    alpha_grid: tuple[float, ...] = ALPHA_GRID
    """Scaling coefficients tried for task arithmetic and TIES, chosen on val."""
    ties_top_k: float = field(default=0.2, metadata=_UNIT)
    max_fit_per_task: int | None = field(default=None, metadata=_OPTIONAL_POSITIVE)
    """Cap on the fitting samples per task (a seeded subset); null = all of them."""
    max_test_per_task: int | None = field(default=None, metadata=_OPTIONAL_POSITIVE)


@dataclass(frozen=True)
class GuideConfig:
    """The variational family (METHOD §3) and the gating rule (§4)."""

    kind: Literal["amortized", "task_level"] = "amortized"
    hidden_dim: int | None = field(default=None, metadata=_OPTIONAL_POSITIVE)
    """Width of g_φ's hidden layer; null = feature_dim / 4."""
    gating: Literal["gated", "ungated"] = "gated"
    tau0: float = field(default=0.05, metadata=_NON_NEGATIVE)
    beta: float = field(default=1.0, metadata=_NON_NEGATIVE)
    sharpness: float = field(default=20.0, metadata=_POSITIVE)
    temperature: float = field(default=0.5, metadata=_POSITIVE)
    init_loc: float = 0.3
    init_scale: float = field(default=0.05, metadata=_POSITIVE)
    init_prob: float = field(default=0.7, metadata=check(lambda v: 0 < v < 1, "must be in (0, 1)"))


@dataclass(frozen=True)
class SVISettings:
    """Stochastic variational inference (METHOD §5)."""

    steps: int = field(default=300, metadata=_POSITIVE)
    lr: float = field(default=5e-3, metadata=_POSITIVE)
    batch_size: int = field(default=64, metadata=_POSITIVE)
    elbo: Literal["meanfield", "trace"] = "meanfield"
    num_particles: int = field(default=1, metadata=_POSITIVE)
    kl_weight: float = field(default=1.0, metadata=_NON_NEGATIVE)
    kl_anneal_steps: int = field(default=0, metadata=_NON_NEGATIVE)
    lr_decay: float = field(default=0.1, metadata=_UNIT)
    """Total learning-rate decay over the run (ClippedAdam's ``lrd`` is derived from it)."""
    clip_norm: float = field(default=10.0, metadata=_POSITIVE)
    checkpoint_every: int = field(default=50, metadata=_NON_NEGATIVE)
    """Write an SVI checkpoint every this many steps (0: only at the end); a rerun continues from it."""


@dataclass(frozen=True)
class BaselineSettings:
    """Training of the deterministic baselines (aTLAS, meta-network) by cross-entropy; learning-rate decay,
    gradient clipping and checkpoints follow the ``svi`` section."""

    steps: int = field(default=300, metadata=_POSITIVE)
    lr: float = field(default=5e-3, metadata=_POSITIVE)
    batch_size: int = field(default=64, metadata=_POSITIVE)


@dataclass(frozen=True)
class EvalSettings:
    batch_size: int = field(default=256, metadata=_POSITIVE)
    mc_samples: int = field(default=0, metadata=_NON_NEGATIVE)
    """Monte Carlo predictive samples for the VTVC methods (0 = the deterministic gated prediction)."""
    ece_bins: int = field(default=15, metadata=_POSITIVE)


@dataclass(frozen=True)
class VariantConfig:
    """A named variant of a built-in method: ``set`` maps dotted keys to values (e.g. ``prior.pi: 0.1``)."""

    method: str
    set: dict[str, Any] = field(default_factory=dict)


def _default_prior() -> dict[str, Any]:
    return {"kind": "spike_and_slab", "pi": 0.5, "slab": {"loc": 0.0, "scale": 1.0}}


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: zoo, protocol, methods to compare, prior, guide, SVI and evaluation settings."""

    name: str = "experiment"
    seed: int = 0
    threads: int | None = field(default=None, metadata=_OPTIONAL_POSITIVE)
    """torch intra-op threads for the run (null: torch's default). Tiny ViTs run fastest on 1."""
    zoo: ZooConfig = field(default_factory=ZooConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    blocks: str | tuple[str, ...] = "tensor"
    """Block partition: "tensor", "layer", or a list of parameter-name patterns."""
    methods: tuple[str, ...] = METHODS
    variants: dict[str, VariantConfig] = field(default_factory=dict)
    prior: dict[str, Any] = field(default_factory=_default_prior)
    """Declarative prior (METHOD §2), passed to the Pyro core's ``PriorSpec.from_mapping``."""
    guide: GuideConfig = field(default_factory=GuideConfig)
    svi: SVISettings = field(default_factory=SVISettings)
    baselines: BaselineSettings = field(default_factory=BaselineSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)


def to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (what a run directory's ``config.yaml`` holds)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=110)


def digest(cfg: ExperimentConfig) -> str:
    """SHA-256 of the resolved config: two runs are the same run iff their digests agree."""
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()


def _validate(cfg: ExperimentConfig) -> None:
    """Checks across keys (those within one key are field metadata)."""
    zoo = cfg.zoo
    real = ("model", "pretrained", "finetuned", "data_root", "clip", "heads")
    if zoo.preset is None:
        missing = [k for k in real[:4] if not getattr(zoo, k)]
        if not zoo.clip and not zoo.heads:
            missing.append("clip")
        if missing:
            raise ConfigError(f"zoo.{missing[0]}: required when zoo.preset is null (real checkpoints)"
                              + ("; or give zoo.heads" if missing[0] == "clip" else ""))
        lacking = [t for t in zoo.finetuned if zoo.heads and t not in zoo.heads]
        if lacking:
            raise ConfigError(f"zoo.heads.{lacking[0]}: missing; give a head file for every task or none")
    else:
        given = [k for k in real if getattr(zoo, k)]
        if given:
            raise ConfigError(f"zoo.{given[0]}: only for real checkpoints; set zoo.preset: null to use it")
    if zoo.tasks is not None and len(set(zoo.tasks)) != len(zoo.tasks):
        raise ConfigError(f"zoo.tasks: duplicate task names in {list(zoo.tasks)}")
    if not cfg.protocol.alpha_grid:
        raise ConfigError("protocol.alpha_grid: must not be empty")
    if isinstance(cfg.blocks, str) and cfg.blocks not in ("tensor", "layer"):
        raise ConfigError(f"blocks: must be tensor, layer or a list of name patterns; got {cfg.blocks!r}")
    for name, variant in cfg.variants.items():
        if not _NAME.match(name):
            raise ConfigError(f"variants.{name}: a variant name may hold letters, digits, '_' and '-' only")
        if name in METHODS:
            raise ConfigError(f"variants.{name}: a variant cannot take a built-in method's name")
        if variant.method not in FITTED_METHODS:
            raise ConfigError(
                f"variants.{name}.method: must be one of {', '.join(FITTED_METHODS)}; got {variant.method!r}"
            )
    known = (*METHODS, *cfg.variants)
    if not cfg.methods:
        raise ConfigError("methods: must name at least one method")
    for i, method in enumerate(cfg.methods):
        if method not in known:
            raise ConfigError(f"methods[{i}]: unknown method {method!r}; known: {', '.join(known)}")
        if method in cfg.methods[:i]:
            raise ConfigError(f"methods[{i}]: {method!r} is listed twice")
    if "vtvc_merged" in cfg.methods and "vtvc" not in cfg.methods:
        raise ConfigError("methods: vtvc_merged merges the posterior of vtvc; list vtvc too")
    if "kind" not in cfg.prior:
        raise ConfigError("prior.kind: required (e.g. spike_and_slab, gaussian)")
    try:
        prior = PriorSpec.from_mapping(cfg.prior)
    except (TypeError, ValueError) as err:
        message = str(err)
        raise ConfigError(message if message.startswith("prior") else f"prior.{message}") from err
    if prior.relaxed and cfg.guide.gating == "gated":
        raise ConfigError("guide.gating: a relaxed spike (prior.temperature) needs gating: ungated")


def from_dict(raw: Mapping[str, Any]) -> ExperimentConfig:
    """Validate a raw mapping (and every variant it declares) into an :class:`ExperimentConfig`."""
    cfg = build(ExperimentConfig, raw)
    _validate(cfg)
    for name in cfg.variants:
        variant_config(cfg, name)
    return cfg


def variant_config(cfg: ExperimentConfig, method: str) -> ExperimentConfig:
    """The settings ``method`` runs with: ``cfg`` itself, or ``cfg`` with a variant's ``set`` applied."""
    variant = cfg.variants.get(method)
    if variant is None:
        return cfg
    raw = to_dict(cfg)
    for key, value in variant.set.items():
        where = f"variants.{method}.set.{key}"
        allowed = any(key == s or key.startswith(s + ".") for s in VARIANT_SECTIONS)
        if not KEY_PATTERN.match(key) or not allowed:
            raise ConfigError(f"{where}: a variant may only set keys under {', '.join(VARIANT_SECTIONS)}")
        try:
            set_dotted(raw, key, value)
        except ConfigError as err:
            raise ConfigError(f"variants.{method}.set: {err}") from err
    try:
        resolved = build(ExperimentConfig, raw)
        _validate(resolved)
    except ConfigError as err:
        raise ConfigError(f"variants.{method}.set: {err}") from err
    return resolved


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML config, apply ``--key.sub=value`` overrides in order, validate, return it frozen."""
    raw = read_yaml_file(Path(path))
    raw.setdefault("prior", _default_prior())  # so that ``--prior.pi=0.2`` edits the default prior
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
    return from_dict(raw)
