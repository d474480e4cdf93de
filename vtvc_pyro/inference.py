"""The SVI engine (METHOD §5): ELBO choice, mini-batches scaled to the full data, KL annealing, ClippedAdam
with a total learning-rate decay, a NaN/inf guard, a per-step record of the objective and its parts, and
checkpoints a resumed run continues from exactly.

The fit runs in its own param-store scope: it neither reads nor leaks global param-store entries, and the
fitted values stay in the guide's (and model's) modules.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import zero_grads
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from vtvc_pyro import distributed
from vtvc_pyro.data import (
    LoaderConfig,
    StepBatchSampler,
    batch_loader,
    sequential_batches,
    step_order,
)
from vtvc_pyro.distributed import ShardedBatch
from vtvc_pyro.io import atomic_path
from vtvc_pyro.model import Batch, FrozenNetworks, NonFiniteError

ELBOS = ("meanfield", "trace")
CHECKPOINT_FORMAT = "vtvc-svi-checkpoint/2"
# Fields that may change between a run and its resumption without changing what it computes.
_RESUME_FREE = ("checkpoint_every", "progress", "feature_batch_size", "device")


class CheckpointError(ValueError):
    """An SVI checkpoint that cannot be resumed from (truncated, unreadable, another format, non-finite
    values); the message names the file. The fit can be restarted from scratch (``resume=False``)."""


@dataclass(frozen=True)
class SVIConfig:
    """Settings of one SVI fit. ``lr_decay`` is the total decay over the run (ClippedAdam ``lrd =
    lr_decay ** (1 / steps)``); ``checkpoint_every = 0`` writes a checkpoint only at the end.

    ``kl_weight`` scales the latent sites, linearly warmed up over the first ``kl_anneal_steps``. Every sample
    pays the KL of its own ``T·B`` components against a single label, so at weight 1 (the plain ELBO) the
    posterior stays at the prior and gates everything off; the default 0.01 is at the low end of the
    authors' 0.01–0.1, and the warm-up lets the likelihood pick components before the KL prunes them.
    """

    steps: int = 300
    batch_size: int = 64
    lr: float = 5e-3
    lr_decay: float = 0.1
    clip_norm: float = 10.0
    elbo: str = "meanfield"
    num_particles: int = 1
    kl_weight: float = 0.01
    kl_anneal_steps: int = 150
    seed: int = 0
    checkpoint_every: int = 0
    feature_batch_size: int = 256
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "num_particles", "feature_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, int) and value > 0):
                raise ValueError(f"svi.{name}: must be a positive integer, got {getattr(self, name)!r}")
        for name in ("kl_anneal_steps", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, int) and value >= 0):
                raise ValueError(f"svi.{name}: must be a non-negative integer, got {getattr(self, name)!r}")
        for name in ("lr", "clip_norm", "kl_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value)
                                               and value > 0):
                raise ValueError(f"svi.{name}: must be > 0 and finite, got {value!r}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"svi.lr_decay: must be in (0, 1], got {self.lr_decay!r}")
        if self.elbo not in ELBOS:
            raise ValueError(f"svi.elbo: {self.elbo!r} is not an ELBO; allowed: {', '.join(ELBOS)}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> SVIConfig:
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(mapping) - set(allowed))
        if unknown:
            raise ValueError(f"svi.{unknown[0]}: unknown field; allowed: {', '.join(allowed)}")
        return cls(**mapping)

    def kl_scale(self, step: int) -> float:
        """The latent sites' scale at ``step`` (1-based)."""
        if self.kl_anneal_steps == 0:
            return self.kl_weight
        return self.kl_weight * min(1.0, step / self.kl_anneal_steps)


@dataclass(frozen=True)
class StepInfo:
    """One SVI step, per datum: mini-batch estimates scaled to the full data (``N / n``). What the per-step
    callback receives and what :class:`FitResult` keeps."""

    step: int
    kl_scale: float  # the KL weight of this step (kl_weight × warm-up)
    lr: float
    tempered_elbo: float  # the objective that was optimised: expected_log_likelihood − kl_scale · kl
    elbo: float  # the ELBO at KL weight 1: expected_log_likelihood − kl
    expected_log_likelihood: float  # E_q[log p(y | x, coef)]
    kl: float  # KL(q ‖ p) of the latent sites


STEP_FIELDS = tuple(f.name for f in dataclasses.fields(StepInfo))
PER_DATUM = ("tempered_elbo", "elbo", "expected_log_likelihood", "kl")


@dataclass
class FitResult:
    """``history[i]`` is the record of step ``i + 1`` (steps before a resume included)."""

    history: list[StepInfo]
    steps: int
    seconds: float
    start_step: int
    features0: torch.Tensor = field(repr=False)

    def _column(self, name: str) -> list[float]:
        return [getattr(record, name) for record in self.history]

    @property
    def tempered_elbo(self) -> list[float]:
        return self._column("tempered_elbo")

    @property
    def elbo(self) -> list[float]:
        return self._column("elbo")

    @property
    def expected_log_likelihood(self) -> list[float]:
        return self._column("expected_log_likelihood")

    @property
    def kl(self) -> list[float]:
        return self._column("kl")


@torch.no_grad()
def pretrained_features(frozen: FrozenNetworks, data: Dataset, *, batch_size: int = 256,
                        device: torch.device | str = "cpu", cache_path: str | os.PathLike | None = None,
                        loader: LoaderConfig | None = None) -> torch.Tensor:
    """``[N, D]`` features ``normalize(f(x; θ0))`` of every item (``frozen``: anything with a
    ``features0(images)`` method, e.g. :class:`FrozenNetworks`), computed once (on CPU). With ``cache_path``
    they are read from / written to a safetensors file; a cache whose first items no longer match is rebuilt.
    Across distributed ranks each encodes a contiguous share and all receive the whole; rank 0 writes."""
    num_data = len(data)
    if num_data == 0:
        raise ValueError("the dataset is empty")

    def compute(start: int, stop: int) -> torch.Tensor:
        batches = batch_loader(data, sequential_batches(start, stop, batch_size), loader, device)
        return torch.cat([frozen.features0(images.to(device, non_blocking=True)).cpu()
                          for _, images, _, _ in batches])

    if cache_path is not None and Path(cache_path).is_file():
        cached = load_file(str(cache_path))["features0"]
        probe = min(8, num_data)
        if cached.shape[0] == num_data and torch.allclose(cached[:probe], compute(0, probe), atol=1e-5):
            return cached
    rows = distributed.local_rows(num_data)
    features = distributed.join_rows(compute(rows.start, rows.stop), num_data)
    if cache_path is not None and distributed.is_main():
        with atomic_path(cache_path) as tmp:
            save_file({"features0": features.contiguous()}, str(tmp))
    distributed.barrier()
    return features


class _RecordsParts:
    """Splits every particle's ELBO into the observed sites' log-likelihood and the latent sites' KL (as
    scaled in the traces), computed the way the ELBO computes it; ``parts`` holds one pair per particle of the
    last evaluation."""

    parts: list[tuple[float, float]]

    def _get_traces(self, model: Callable, guide: Callable, args: Any, kwargs: Any) -> Any:
        self.parts = []
        for model_trace, guide_trace in super()._get_traces(model, guide, args, kwargs):
            observed = [name for name, site in model_trace.nodes.items()
                        if site["type"] == "sample" and site["is_observed"]]
            log_likelihood = sum(float(torch.as_tensor(model_trace.nodes[name]["log_prob_sum"]).detach())
                                 for name in observed)
            latent = model_trace.copy()
            for name in observed:
                latent.remove_node(name)
            with torch.no_grad():
                kl = self._differentiable_loss_particle(latent, guide_trace)[0]
            self.parts.append((log_likelihood, float(kl)))
            yield model_trace, guide_trace


class MeanFieldELBO(_RecordsParts, TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` (analytic KL where registered) that records its parts."""


class MonteCarloELBO(_RecordsParts, Trace_ELBO):
    """``Trace_ELBO`` (Monte Carlo KL) that records its parts."""


def make_elbo(config: SVIConfig) -> MeanFieldELBO | MonteCarloELBO:
    """The ELBO ``config.elbo`` names: ``meanfield`` or ``trace``."""
    cls = MeanFieldELBO if config.elbo == "meanfield" else MonteCarloELBO
    return cls(num_particles=config.num_particles, max_plate_nesting=3)


def _rng_state() -> dict[str, Any]:
    """torch, Python ``random`` and numpy states (Pyro draws from torch's); tensors and tuples only, so the
    checkpoint loads with ``weights_only=True``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"torch": torch.get_rng_state(), "random": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])  # a run resumed on another machine draws afresh there


def _named_params() -> dict[str, torch.Tensor]:
    """The param store's unconstrained parameters by name."""
    return dict(pyro.get_param_store().named_parameters())


def _restore(snapshot: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in _named_params().items():
            if name in snapshot:
                param.copy_(snapshot[name])


def _checkpoint_state(step: int, config: SVIConfig, optim: pyro.optim.PyroOptim, order: dict[str, int],
                      history: list[StepInfo]) -> dict[str, Any]:
    """Everything a resumed run needs to continue exactly as an uninterrupted one."""
    return {"format": CHECKPOINT_FORMAT, "step": step, "config": dataclasses.asdict(config),
            "params": {n: p.detach().cpu().clone() for n, p in _named_params().items()},
            "optimizer": optim.get_state(), "rng": _rng_state(), "data_order": order,
            "history": [dataclasses.asdict(record) for record in history]}


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write a checkpoint atomically (torch format, tensors and plain containers only)."""
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)


_CHECKPOINT_KEYS = ("step", "config", "params", "optimizer", "rng", "data_order", "history")


def _tensors(value: Any, where: str) -> list[tuple[str, torch.Tensor]]:
    """Every tensor in nested dicts / lists / tuples, with its path."""
    if isinstance(value, torch.Tensor):
        return [(where, value)]
    if isinstance(value, Mapping):
        return [t for key, item in value.items() for t in _tensors(item, f"{where}[{key!r}]")]
    if isinstance(value, (list, tuple)):
        return [t for i, item in enumerate(value) for t in _tensors(item, f"{where}[{i}]")]
    return []


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint written by :func:`fit_svi`; :class:`CheckpointError` naming the file when it is truncated,
    unreadable, of another format, or holds a non-finite parameter or optimizer value."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{path}: unreadable SVI checkpoint (truncated or corrupt: "
                              f"{type(err).__name__}); the fit can restart from scratch") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint (found {found!r}); the fit can "
                              "restart from scratch")
    missing = [key for key in _CHECKPOINT_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path}: SVI checkpoint lacks {missing[0]!r}; the fit can restart from "
                              "scratch")
    named = [(f"parameter {name!r}", value) for name, value in state["params"].items()]
    for where, tensor in named + _tensors(state["optimizer"], "optimizer state"):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: {where} holds non-finite values; the fit can restart from "
                                  "scratch")
    return state


def _check_resumable(state: Mapping[str, Any], config: SVIConfig, num_data: int, path: Any) -> None:
    now = dataclasses.asdict(config)
    changed = [k for k, v in state["config"].items() if k not in _RESUME_FREE and now.get(k) != v]
    if changed:
        raise ValueError(f"{path}: cannot resume with changed svi.{changed[0]} "
                         f"({state['config'][changed[0]]!r} -> {now[changed[0]]!r})")
    if state["data_order"]["num_data"] != num_data:
        raise ValueError(f"{path}: checkpoint was written for {state['data_order']['num_data']} data, "
                         f"this dataset has {num_data}")
    if state["step"] > config.steps:
        raise ValueError(f"{path}: checkpoint is at step {state['step']} > svi.steps={config.steps}")


def _load_params(saved: Mapping[str, torch.Tensor], path: Any) -> None:
    params = _named_params()
    if set(saved) != set(params):
        raise ValueError(f"{path}: parameters {sorted(set(saved) ^ set(params))} are in only one of the "
                         "checkpoint and the model/guide")
    with torch.no_grad():
        for name, param in params.items():
            if param.shape != saved[name].shape:
                raise ValueError(f"{path}: parameter {name!r} has shape {tuple(saved[name].shape)} in the "
                                 f"checkpoint, {tuple(param.shape)} in the model/guide")
            param.copy_(saved[name])


def save_fitted(module: nn.Module, path: str | os.PathLike, metadata: Mapping[str, str] | None = None
                ) -> None:
    """A fitted module's parameters and buffers as safetensors, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata or {}))


def load_fitted(module: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load :func:`save_fitted`'s file into ``module``; ``ValueError`` naming the file and the tensor when it
    is unreadable, holds non-finite values, or does not match the module."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        if isinstance(err, (FileNotFoundError, PermissionError)):
            raise
        raise ValueError(f"{path}: unreadable fitted-module file (truncated or corrupt: {err})") from err
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: tensor {name!r} holds non-finite values")
    expected = module.state_dict()
    if set(tensors) != set(expected):
        raise ValueError(f"{path}: tensors {sorted(set(tensors) ^ set(expected))} are in only one of the "
                         "file and the module")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)} in the file, "
                             f"{tuple(expected[name].shape)} in the module")
    module.load_state_dict(tensors)
    return module


def _step(svi: SVI, elbo: MeanFieldELBO | MonteCarloELBO, batch: Batch, kl_scale: float
          ) -> tuple[float, float]:
    """``SVI.step`` that checks the loss and gradients before it updates anything; returns the mean over
    particles of the log-likelihood and of the (tempered) KL, as scaled in the traces."""
    with poutine.trace(param_only=True) as capture:
        loss = elbo.loss_and_grads(svi.model, svi.guide, batch, kl_scale=kl_scale)
    distributed.all_reduce_grads(p for _, p in sorted(_named_params().items()))
    params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
    if not math.isfinite(loss):
        raise NonFiniteError(f"the objective is {loss} although every sample site was finite")
    for name, param in _named_params().items():
        if param.grad is not None and not torch.isfinite(param.grad).all():
            raise NonFiniteError(f"the gradient of parameter {name!r} is non-finite")
    svi.optim(params)
    zero_grads(params)
    parts = elbo.parts
    return sum(p[0] for p in parts) / len(parts), sum(p[1] for p in parts) / len(parts)


def _guarded(step: int, action: Callable[[], Any]) -> Any:
    """Run ``action`` (one step, or the pass that registers the parameters before step 1); on a NaN/inf the
    parameters go back to their values before it, and the error names the step."""
    params = _named_params()
    snapshot = {name: p.detach().clone() for name, p in params.items()}
    try:
        out = action()
        bad = [name for name, p in _named_params().items() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteError(f"parameter {bad[0]!r} became non-finite")
    except NonFiniteError as err:
        zero_grads(set(_named_params().values()))
        _restore(snapshot)
        before = f"their values after step {step - 1}" if step > 1 else "their initial values"
        raise NonFiniteError(f"step {step}: {err}; parameters restored to {before}") from err
    return out


def _record(step: int, kl_scale: float, lr: float, parts: tuple[float, float], num_data: int) -> StepInfo:
    """Per-datum parts of one step; the KL at weight 1 is the traces' KL divided by ``kl_scale``."""
    log_likelihood, tempered_kl = parts[0] / num_data, parts[1] / num_data
    kl = tempered_kl / kl_scale
    return StepInfo(step, kl_scale, lr, log_likelihood - tempered_kl, log_likelihood - kl, log_likelihood, kl)


def fit_svi(model: Callable, guide: Callable, data: Dataset, config: SVIConfig | None = None, *,
            features0: torch.Tensor | None = None, checkpoint_path: str | os.PathLike | None = None,
            resume: bool = True, callback: Callable[[StepInfo], None] | None = None,
            loader: LoaderConfig | None = None) -> FitResult:
    """Fit ``guide`` (and any parameters of ``model``) by SVI on ``data`` (items ``(index, image, label,
    task_id)``) on ``config.device``. ``model.frozen`` provides the pre-trained features. With
    ``checkpoint_path`` and ``resume``, an existing checkpoint is continued exactly (:class:`CheckpointError`
    when it cannot be read); ``callback`` runs after every step (on every rank). Images are loaded by a
    ``DataLoader`` (``loader``); in a distributed run (:mod:`vtvc_pyro.distributed`) each rank loads and
    encodes its rows of every batch and rank 0 alone writes the checkpoint."""
    config = config or SVIConfig()
    started = time.perf_counter()
    device = torch.device(config.device)
    for module in (model, guide):
        if isinstance(module, torch.nn.Module):
            module.to(device)
    num_data = len(data)
    if features0 is None:
        features0 = pretrained_features(model.frozen, data, batch_size=config.feature_batch_size,
                                        device=device, loader=loader)
    if features0.shape[0] != num_data:
        raise ValueError(f"features0 has {features0.shape[0]} rows for a dataset of {num_data}")
    lrd = config.lr_decay ** (1.0 / config.steps)
    optim = pyro.optim.ClippedAdam({"lr": config.lr, "clip_norm": config.clip_norm, "lrd": lrd})
    elbo = make_elbo(config)
    svi = SVI(model, guide, optim, elbo)
    state = None
    if checkpoint_path is not None and resume and Path(checkpoint_path).is_file() and distributed.is_main():
        state = load_checkpoint(checkpoint_path)
    state = distributed.broadcast_object(state)  # every rank resumes from rank 0's checkpoint, or none does
    if state is not None:
        _check_resumable(state, config, num_data, checkpoint_path)
    sharded = distributed.active()
    start = 0 if state is None else state["step"]

    def batches(start: int, stop: int) -> Iterator[Batch]:
        """The batches of steps ``start + 1 … stop`` (this rank's images of each)."""
        sampler = StepBatchSampler(num_data, config.batch_size, config.seed, start, stop,
                                   distributed.rank(), distributed.world_size())
        for positions, images, labels, task in batch_loader(data, sampler, loader, device):
            if sharded:  # every rank needs the whole batch's positions, labels and tasks
                rows = distributed.gather_rows(torch.stack([positions, labels, task], 1))
                positions, labels, task = rows.t()
            yield (ShardedBatch if sharded else Batch)(
                positions.to(device), images.to(device, non_blocking=True), features0[positions].to(device),
                labels.to(device), task.to(device), num_data)

    def register() -> None:  # the parameters enter this scope's store on a first, gradient-free pass
        first = next(batches(start, start + 1))
        with torch.no_grad(), poutine.trace(param_only=True):
            guide(first, kl_scale=1.0)
            model(first, kl_scale=1.0)

    with distributed.split_encoder(model), pyro.get_param_store().scope():
        _guarded(start + 1, register)
        if state is None:
            history = []
            pyro.set_rng_seed(config.seed)
        else:
            history = [StepInfo(**record) for record in state["history"]]
            _load_params(state["params"], checkpoint_path)
            optim.set_state(state["optimizer"])
            _set_rng_state(state["rng"])
        distributed.broadcast_params(p for _, p in sorted(_named_params().items()))
        with tqdm(total=config.steps, initial=start, desc="svi", leave=False,
                  disable=not config.progress or not distributed.is_main()) as bar:
            for step, batch in enumerate(batches(start, config.steps), start + 1):
                kl_scale = config.kl_scale(step)
                parts = _guarded(step, lambda: _step(svi, elbo, batch, kl_scale))  # noqa: B023 (runs at once)
                history.append(_record(step, kl_scale, config.lr * lrd**step, parts, num_data))
                every = config.checkpoint_every
                if checkpoint_path is not None and (step == config.steps or (every and step % every == 0)):
                    if distributed.is_main():
                        order = step_order(step, num_data, config.batch_size)
                        snapshot = _checkpoint_state(step, config, optim, order, history)
                        save_checkpoint(checkpoint_path, snapshot)
                    distributed.barrier()
                bar.update(1)
                bar.set_postfix(tempered_elbo=f"{history[-1].tempered_elbo:.4f}")
                if callback is not None:
                    callback(history[-1])
    return FitResult(history, config.steps, time.perf_counter() - started, start, features0)
