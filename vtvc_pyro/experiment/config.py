"""The experiment schema: what a ``vtvc run`` config holds, as typed pydantic models that embed the library's
own settings (:class:`~vtvc_pyro.inference.SVIConfig`, :class:`~vtvc_pyro.guide.GuideConfig`,
:class:`~vtvc_pyro.priors.PriorSpec`), so each knob has one default and one check, run at load time.

Every error names the offending key (``svi.stepz: unknown key; allowed: steps, lr, ...``). A config file may
start from another one with ``extends: other.yaml`` (path relative to the file); the child's keys win.
Overrides are dotted: ``--svi.lr=1e-3``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from vtvc_pyro.data import LoaderConfig
from vtvc_pyro.evaluate import ALPHA_GRID, ECE_BINS
from vtvc_pyro.guide import GuideConfig
from vtvc_pyro.inference import SVIConfig
from vtvc_pyro.priors import PriorSpec

__all__ = ["ConfigError", "ExperimentConfig", "load_config", "parse_override", "variant_config"]

METHODS = (
    "zeroshot", "finetuned", "task_arithmetic", "ties", "atlas", "metanet",
    "vtvc_gaussian", "vtvc_stochastic", "vtvc", "vtvc_merged",
)
"""Built-in methods, in the order of the comparison table."""

NOT_NEGATING = ("ties", "vtvc_merged")
"""Methods the negation protocol does not define (METHOD §8)."""

FITTED_METHODS = ("task_arithmetic", "ties", "atlas", "metanet", "vtvc_gaussian", "vtvc_stochastic", "vtvc")
"""Methods whose settings a variant may change (``variants:``)."""

VARIANT_SECTIONS = (
    "prior", "guide", "svi", "baselines", "selection", "blocks", "protocol.alpha_grid", "protocol.ties_top_k",
)
"""The only keys a variant's ``set:`` may touch: the ones that change how a method is fitted."""

RUN_LEVEL_SVI = {"seed": "seed", "feature_batch_size": "eval.batch_size", "progress": "--quiet",
                 "device": "device"}
"""``SVIConfig`` fields a run sets itself, and where a user sets them instead."""

KEY_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z_0-9][A-Za-z0-9_\-]*)*$")
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
_SVI = SVIConfig()


class ConfigError(ValueError):
    """A config or override that does not validate; the message starts with the offending key."""


# ---------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """Safe YAML that reads ``1e-3`` as a float (YAML 1.1 would make it a string) and refuses duplicate keys
    (YAML would silently keep the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """YAML text → data; a syntax error or a duplicate key is a :class:`ConfigError` naming ``source``."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: invalid YAML: {err}") from err


def read_yaml_file(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping from ``path``, with its ``extends:`` chain merged in (the file's own keys win)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'extends' cycle through {[str(p) for p in seen]}")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    raw = parse_yaml(path.read_text(), str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping, got {type(raw).__name__}")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise ConfigError(f"extends: expected a file path, got {parent!r}")
    return _deep_merge(read_yaml_file(path.parent / parent, (*seen, path)), raw)


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``top``'s keys on top; mappings present in both are merged recursively."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``--svi.lr=1e-3`` → ``("svi.lr", 0.001)``; the value is read as a YAML scalar (or flow list/map)."""
    body = text[2:] if text.startswith("--") else None
    key, sep, value = (body or "").partition("=")
    if body is None or not KEY_PATTERN.match(key):
        raise ConfigError(f"override {text!r}: expected --key.sub=value (a dotted key, e.g. --svi.steps=200)")
    if not sep:
        raise ConfigError(f"{key}: override {text!r} has no value; expected --{key}=VALUE")
    return key, parse_yaml(value, f"{key}: override value") if value.strip() else ""


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for ``key = "a.b.c"``, creating missing sections."""
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"{key}: {where} is a value ({child!r}), not a section")
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------- schema


def _prior(value: Any) -> PriorSpec:
    if not isinstance(value, (Mapping, PriorSpec)):
        raise ValueError(f"expected a mapping, got {type(value).__name__} {value!r}")
    try:
        return PriorSpec.from_mapping(value)
    except TypeError as err:  # a wrong type inside a nested field
        raise ValueError(str(err)) from err


Prior = Annotated[PriorSpec, PlainValidator(_prior), PlainSerializer(PriorSpec.to_mapping)]
PositiveInt = Annotated[int, Field(gt=0, strict=True)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ZooConfig(_Section):
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
    finetuned: dict[str, str] = {}
    clip: str | None = None
    heads: dict[str, str] = {}
    trust_pickle: bool = False
    data_root: str | None = None
    tasks: tuple[str, ...] | None = None
    """Use only these tasks (in this order); null = every task of the zoo."""

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, tasks: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if tasks is not None:
            if not tasks:
                raise ValueError("must name at least one task, or be null for every task")
            twice = sorted({t for t in tasks if tasks.count(t) > 1})
            if twice:
                raise ValueError(f"task {twice[0]!r} is listed twice")
        return tasks

    @model_validator(mode="after")
    def _sources(self) -> ZooConfig:
        real = ("model", "pretrained", "finetuned", "data_root", "clip", "heads")
        if self.preset is None:
            missing = [k for k in real[:4] if not getattr(self, k)]
            if not self.clip and not self.heads:
                missing.append("clip")
            if missing:
                raise ValueError(f"zoo.{missing[0]}: required when zoo.preset is null (real checkpoints)"
                                 + ("; or give zoo.heads" if missing[0] == "clip" else ""))
            lacking = [t for t in self.finetuned if self.heads and t not in self.heads]
            if lacking:
                raise ValueError(f"zoo.heads.{lacking[0]}: missing; give a head file for every task or none")
        else:
            given = [k for k in real if getattr(self, k)]
            if given:
                raise ValueError(f"zoo.{given[0]}: only for real checkpoints; set zoo.preset: null to use it")
        return self


class ProtocolConfig(_Section):
    """Task addition (one composition for all tasks), knowledge transfer (compose the other tasks) or negation
    (subtract a target task, keep the others)."""

    name: Literal["task_addition", "knowledge_transfer", "negation"] = "task_addition"
    targets: tuple[str, ...] | None = None
    """Knowledge-transfer or negation target tasks; null = every task."""
    alpha_grid: tuple[FiniteFloat, ...] = Field(default=ALPHA_GRID, min_length=1)
    """Scaling coefficients tried for task arithmetic and TIES, chosen on val."""
    ties_top_k: float = Field(default=0.2, gt=0, le=1)
    max_fit_per_task: PositiveInt | None = None
    """Cap on the fitting samples per task (a seeded subset); null = all of them."""
    max_test_per_task: PositiveInt | None = None


class BaselineSettings(_Section):
    """Training of the deterministic baselines (aTLAS, meta-network) by cross-entropy; learning-rate decay,
    gradient clipping and checkpoints follow the ``svi`` section."""

    steps: PositiveInt = _SVI.steps
    lr: FiniteFloat = Field(default=_SVI.lr, gt=0)
    batch_size: PositiveInt = _SVI.batch_size


class SelectionSettings(_Section):
    """Held-out choice of ``svi.kl_weight`` for every VTVC method (METHOD §5), never on test: the fit data are
    split per task with ``split_seed`` (a ``heldout`` share of each task's fit samples held out); each
    candidate is fitted on the rest and scored on the held-out part by mean normalised accuracy (the
    fine-tuned models' val accuracy as the normaliser; ties go to the smaller NLL); the best one is then
    fitted on all fit data. ``repeats`` > 1 repeats this on the splits ``split_seed + 1, ...`` and ranks the
    candidates by their mean scores (``repeats`` fits per candidate). No candidates: ``svi.kl_weight`` is
    used as given."""

    kl_weights: tuple[Annotated[float, Field(gt=0, allow_inf_nan=False)], ...] = ()
    heldout: float = Field(default=0.2, gt=0, lt=1)
    split_seed: Annotated[int, Field(ge=0, strict=True)] = 0
    repeats: Annotated[int, Field(ge=1, strict=True)] = 1

    @field_validator("kl_weights")
    @classmethod
    def _distinct(cls, values: tuple[float, ...]) -> tuple[float, ...]:
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise ValueError(f"{twice[0]!r} is listed twice")
        return values


class EvalSettings(_Section):
    batch_size: PositiveInt = _SVI.feature_batch_size
    mc_samples: Annotated[int, Field(ge=0, strict=True)] = 0
    """Monte Carlo predictive samples for the VTVC methods (0 = the deterministic gated prediction)."""
    posterior_draws: Annotated[int, Field(ge=1, strict=True)] = 20
    """Posterior draws per test sample saved in ``posterior.nc``."""
    posterior_per_task: PositiveInt = 100
    """Test samples per task (the first ones) whose draws ``posterior.nc`` holds."""
    ece_bins: PositiveInt = ECE_BINS


class LoaderSettings(_Section):
    """How passes over images load them (``torch.utils.data.DataLoader``): worker processes, and pinned
    memory (null: when the run computes on CUDA). They change speed, not results."""

    num_workers: Annotated[int, Field(ge=0, strict=True)] = 0
    pin_memory: bool | None = None

    def loader_config(self) -> LoaderConfig:
        return LoaderConfig(num_workers=self.num_workers, pin_memory=self.pin_memory)


class VariantConfig(_Section):
    """A named variant of a built-in method: ``set`` maps dotted keys to values (e.g. ``prior.pi: 0.1``)."""

    method: str
    set: dict[str, Any] = {}


class ExperimentConfig(_Section):
    """One experiment: zoo, protocol, methods to compare, prior, guide, SVI and evaluation settings."""

    name: str = "experiment"
    seed: Annotated[int, Field(ge=0, strict=True)] = 0
    """Seed of the data subsets and splits, and of the learned methods' fits unless ``seeds`` is given."""
    seeds: tuple[Annotated[int, Field(ge=0, strict=True)], ...] | None = None
    """Fit every learned method once per seed (same zoo, data and splits); tables report mean ± sd."""
    threads: PositiveInt | None = None
    """torch intra-op threads for the run (null: torch's default). Tiny ViTs run fastest on 1."""
    workers: PositiveInt = 1
    """Processes that fit the held-out selection's candidates side by side (CPU only: forked, each with
    ``threads`` threads; on CUDA or under torchrun they run one after the other). Same results as 1."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N; under torchrun each process takes its local GPU."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Compute precision of the ViT forward and backward passes (autocast); guide, heads, ELBO and merges
    stay float32."""
    bank_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Storage dtype of the task vectors (merges accumulate in float32)."""
    bank_rank: PositiveInt | None = None
    """Low-rank task vectors: keep this many singular triplets of every 2-D block (null: the exact bank)."""
    bank_energy: Annotated[float, Field(gt=0, le=1)] | None = None
    """Low-rank by energy: the fewest singular triplets holding this share of it (instead of a rank)."""
    loader: LoaderSettings = LoaderSettings()
    zoo: ZooConfig = ZooConfig()
    protocol: ProtocolConfig = ProtocolConfig()
    blocks: str | tuple[str, ...] = "tensor"
    """Block partition: "tensor", "layer", or a list of parameter-name patterns."""
    methods: tuple[str, ...] = METHODS
    variants: dict[str, VariantConfig] = {}
    prior: Prior = PriorSpec()
    guide: GuideConfig = GuideConfig()
    svi: SVIConfig = _SVI
    baselines: BaselineSettings = BaselineSettings()
    selection: SelectionSettings = SelectionSettings()
    eval: EvalSettings = EvalSettings()

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("svi", mode="before")
    @classmethod
    def _svi_keys(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            for key, instead in RUN_LEVEL_SVI.items():
                if key in value:
                    raise ValueError(f"svi.{key}: set by the run; use {instead} instead")
        return value

    @field_serializer("svi")
    def _svi_dump(self, svi: SVIConfig) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(svi).items() if k not in RUN_LEVEL_SVI}

    @model_validator(mode="after")
    def _across_keys(self) -> ExperimentConfig:
        if isinstance(self.blocks, str) and self.blocks not in ("tensor", "layer"):
            raise ValueError(f"blocks: must be tensor, layer or a list of name patterns; got {self.blocks!r}")
        for name, variant in self.variants.items():
            if not _NAME.match(name):
                raise ValueError(f"variants.{name}: a variant name may hold letters, digits, '_', '-' only")
            if name in METHODS:
                raise ValueError(f"variants.{name}: a variant cannot take a built-in method's name")
            if variant.method not in FITTED_METHODS:
                raise ValueError(f"variants.{name}.method: must be one of {', '.join(FITTED_METHODS)}; "
                                 f"got {variant.method!r}")
        known = (*METHODS, *self.variants)
        if not self.methods:
            raise ValueError("methods: must name at least one method")
        for i, method in enumerate(self.methods):
            if method not in known:
                raise ValueError(f"methods[{i}]: unknown method {method!r}; known: {', '.join(known)}")
            if method in self.methods[:i]:
                raise ValueError(f"methods[{i}]: {method!r} is listed twice")
        if self.bank_rank is not None and self.bank_energy is not None:
            raise ValueError("bank_energy: give bank_rank or bank_energy, not both")
        if self.seeds is not None:
            if not self.seeds:
                raise ValueError("seeds: must name at least one seed, or be null for `seed`")
            twice = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
            if twice:
                raise ValueError(f"seeds: seed {twice[0]} is listed twice")
        if "vtvc_merged" in self.methods and "vtvc" not in self.methods:
            raise ValueError("methods: vtvc_merged merges the posterior of vtvc; list vtvc too")
        if self.protocol.name == "negation":
            for i, method in enumerate(self.methods):
                if method in NOT_NEGATING or (method in self.variants and self.variants[method].method
                                              in NOT_NEGATING):
                    raise ValueError(f"methods[{i}]: {method!r} has no negation form; the negation protocol "
                                     f"runs every method but {', '.join(NOT_NEGATING)}")
            if "zeroshot" not in self.methods:
                raise ValueError("methods: the negation protocol reports control accuracy relative to "
                                 "zeroshot; list zeroshot")
        if self.prior.relaxed and self.guide.gating == "gated":
            raise ValueError("guide.gating: a relaxed spike (prior.temperature) needs a stochastic gating")
        return self

    @property
    def fit_seeds(self) -> tuple[int, ...]:
        """The seeds every learned method is fitted with."""
        return self.seeds if self.seeds is not None else (self.seed,)

    def svi_config(self, *, progress: bool = True, device: str = "cpu") -> SVIConfig:
        """The SVI engine's settings for this run (the run-level seed, feature batch size and the resolved
        device filled in)."""
        return dataclasses.replace(self.svi, seed=self.seed, feature_batch_size=self.eval.batch_size,
                                   progress=progress, device=str(device))


# ---------------------------------------------------------------- errors, loading, variants


def _fields_at(loc: Sequence[Any]) -> list[str] | None:
    """The keys allowed at ``loc`` in the schema (for 'unknown key' errors), or None."""
    node: Any = ExperimentConfig
    for part in loc:
        if not (isinstance(node, type) and issubclass(node, BaseModel) and part in node.model_fields):
            return None
        node = node.model_fields[part].annotation
    if isinstance(node, type) and issubclass(node, BaseModel):
        return list(node.model_fields)
    if dataclasses.is_dataclass(node):
        hidden = RUN_LEVEL_SVI if node is SVIConfig else {}
        return [f.name for f in dataclasses.fields(node) if f.name not in hidden]
    return None


def _message(error: Mapping[str, Any]) -> str:
    """One pydantic error as ``key: what is wrong``."""
    loc = [p for p in error["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))]
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    kind, msg = error["type"], error["msg"]
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        allowed = _fields_at(loc[:-1])
        return f"{key}: unknown key" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
    if kind == "missing":
        return f"{key}: required key is missing"
    msg = msg.removeprefix("Value error, ")
    if not key or msg.startswith(f"{key}.") or msg.startswith(f"{key}:") or msg.startswith(f"{key}["):
        return msg
    if re.match(r"^[A-Za-z_][\w.\[\]]*: ", msg):
        section = key.split(".")[0]
        return f"{key}.{msg}" if not msg.startswith(f"{section}.") else msg
    value = error.get("input")
    shown = "" if isinstance(value, Mapping) else f"; got {value!r}"
    return f"{key}: {msg[0].lower()}{msg[1:]}{shown}"


def _kinds(annotation: Any) -> set[Any]:
    """The plain types an annotation admits (``int | None`` → {int, NoneType}; ``Annotated`` unwrapped)."""
    if typing.get_origin(annotation) is Annotated:
        return _kinds(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(annotation)))
    return {annotation}


def _refuse_coercion(raw: Any, node: Any, prefix: str = "") -> None:
    """Refuse what pydantic's lax mode would silently convert: a bool or a string where a number is
    expected, a number or string where a bool is."""
    if not isinstance(raw, Mapping):
        return
    if isinstance(node, type) and issubclass(node, BaseModel):
        hints = {k: f.annotation for k, f in node.model_fields.items()}
    elif dataclasses.is_dataclass(node):
        hints = typing.get_type_hints(node)
    else:
        return
    for key, value in raw.items():
        if key not in hints:
            continue
        where, kinds = f"{prefix}{key}", _kinds(hints[key])
        numeric = kinds & {int, float} and not kinds & {str, bool}
        if (numeric and isinstance(value, (bool, str))) or (kinds & {bool} and not isinstance(value, bool)
                                                             and not kinds - {bool, type(None)}
                                                             and value is not None):
            raise ConfigError(f"{where}: expected {' or '.join(sorted(k.__name__ for k in kinds))}, got "
                              f"{type(value).__name__} {value!r}")
        for kind in kinds:
            _refuse_coercion(value, kind, f"{where}.")


def from_dict(raw: Mapping[str, Any]) -> ExperimentConfig:
    """Validate a raw mapping (and every variant it declares) into an :class:`ExperimentConfig`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: expected a mapping, got {type(raw).__name__}")
    _refuse_coercion(raw, ExperimentConfig)
    try:
        cfg = ExperimentConfig.model_validate(dict(raw))
    except ValidationError as err:
        raise ConfigError(_message(err.errors()[0])) from None
    for name in cfg.variants:
        variant_config(cfg, name)
    return cfg


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """A config as plain YAML/JSON data (what ``from_dict`` reads back)."""
    return cfg.model_dump(mode="json")


def base_method(cfg: ExperimentConfig, name: str) -> str:
    """The built-in method a name of ``methods`` runs: itself, or the method a variant of that name varies."""
    return cfg.variants[name].method if name in cfg.variants else name


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
        _refuse_coercion(raw, ExperimentConfig)
        return ExperimentConfig.model_validate(raw)
    except ConfigError as err:
        raise ConfigError(f"variants.{method}.set: {err}") from None
    except ValidationError as err:
        raise ConfigError(f"variants.{method}.set: {_message(err.errors()[0])}") from None


def to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (what a run directory's ``config.yaml`` holds)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=110)


RUN_FREE = ("device", "loader", "workers")
"""Keys that change where and how fast a run computes, not what: a run may resume with others (a run
started on a GPU continues on a CPU)."""


def digest(cfg: ExperimentConfig) -> str:
    """SHA-256 of the resolved config but :data:`RUN_FREE`: two runs are the same run iff their digests
    agree."""
    data = {k: v for k, v in to_dict(cfg).items() if k not in RUN_FREE}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML config, apply ``--key.sub=value`` overrides in order, validate, return it frozen."""
    raw = read_yaml_file(Path(path))
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
    return from_dict(raw)

