"""What every method of a run shares: the pre-trained encoder, task checkpoints, heads and data splits,
from an embedded zoo preset or from real checkpoints (an open_clip architecture, local pre-trained and
fine-tuned image encoders, zero-shot heads from files or a full CLIP's text tower, the standard datasets)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from vtvc_pyro.experiment.config import ExperimentConfig
from vtvc_pyro.heads import ClassificationHead, HeadBank
from vtvc_pyro.hf_clip import is_hf_directory
from vtvc_pyro.task_vectors import TaskVectorBank

SPLITS = ("train", "val", "test")


@dataclass
class Benchmark:
    """θ0 (``model``, eval mode), the tasks' checkpoints and heads, and ``splits[split][task]`` datasets;
    ``description`` names it in tables, ``source`` says where it was read from."""

    description: str
    source: str
    task_names: list[str]
    model: nn.Module
    heads: HeadBank
    splits: dict[str, dict[str, Dataset]]
    pretrained_path: Path
    finetuned_paths: dict[str, Path]
    trust_pickle: bool = False
    input_files: dict[str, Path] = field(default_factory=dict)
    """The files whose content the results depend on, by role (see :meth:`fingerprint`)."""
    input_identity: dict[str, Any] = field(default_factory=dict)
    """Identities computed from contents by the source itself (an embedded zoo's content fingerprint)."""
    bank_dtype: str = "float32"
    """Storage dtype of the task vectors."""
    low_rank: dict[str, Any] = field(default_factory=dict)
    """``{"rank": r}`` or ``{"energy": e}``: banks are truncated SVDs (``TaskVectorBank.low_rank``)."""
    device: torch.device = torch.device("cpu")
    """Where θ0 (``model``) and the banks live (:meth:`place`)."""
    _banks: dict[str, TaskVectorBank] = field(default_factory=dict, repr=False)

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    def place(self, device: torch.device, bank_dtype: str = "float32", *, rank: int | None = None,
              energy: float | None = None) -> Benchmark:
        """Move θ0 to ``device``; banks are built there with ``bank_dtype`` storage, low-rank when ``rank`` or
        ``energy`` is given."""
        self.model.to(device)
        self.device, self.bank_dtype = device, bank_dtype
        self.low_rank = {"rank": rank, "energy": energy}
        self._banks.clear()
        return self

    def bank(self, blocks: str | Sequence[str] = "tensor") -> TaskVectorBank:
        """The task vectors of every task with the ``blocks`` partition (built once per partition, on
        :attr:`device` with :attr:`bank_dtype` storage)."""
        key = blocks if isinstance(blocks, str) else "\n".join(blocks)
        if key not in self._banks:
            self._banks[key] = TaskVectorBank.from_checkpoints(
                self.pretrained_path, self.finetuned_paths,
                blocks=blocks if isinstance(blocks, str) else list(blocks), dtype=self.bank_dtype,
                trust_pickle=self.trust_pickle, **self.low_rank,
            ).to(self.device)
        return self._banks[key]

    def fingerprint(self) -> dict[str, Any]:
        """Identity of every input: a zoo's content fingerprint (format version, configuration, tensor
        contents), and for checkpoint files their size and modification time, plus the SHA-256 of files
        under 1 MB. A resumed run compares it with the one it started with, so results computed from
        different inputs are never mixed."""
        from vtvc_pyro.io import sha256_file

        identity = dict(self.input_identity)
        for role, path in self.input_files.items():
            stat = path.stat()
            entry: dict[str, int | str] = {"path": str(path), "bytes": stat.st_size}
            if stat.st_size < 2**20:
                entry["sha256"] = sha256_file(path)
            else:
                entry["mtime_ns"] = stat.st_mtime_ns
            identity[role] = entry
        return identity

    def finetuned_state_dict(self, task: str) -> dict[str, torch.Tensor]:
        from vtvc_pyro.checkpoints import load_state_dict

        return load_state_dict(self.finetuned_paths[task], trust_pickle=self.trust_pickle)


def _subset(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    """A seeded random ``limit`` items of ``dataset`` (kept in their original order), or all of it."""
    if limit is None or len(dataset) <= limit:
        return dataset
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit]
    return Subset(dataset, keep.sort().values.tolist())


def _chosen_tasks(available: Sequence[str], wanted: Sequence[str] | None) -> list[str]:
    if wanted is None:
        return list(available)
    unknown = [t for t in wanted if t not in available]
    if unknown:
        raise ValueError(f"zoo.tasks: unknown tasks {unknown}; available: {list(available)}")
    return list(wanted)


def _limit(splits: Mapping[str, Mapping[str, Dataset]], cfg: ExperimentConfig
           ) -> dict[str, dict[str, Dataset]]:
    """Apply ``protocol.max_fit_per_task`` (train and val) and ``max_test_per_task``."""
    limits = {"train": cfg.protocol.max_fit_per_task, "val": cfg.protocol.max_fit_per_task,
              "test": cfg.protocol.max_test_per_task}
    return {s: {t: _subset(ds, limits[s], cfg.seed) for t, ds in per_task.items()}
            for s, per_task in splits.items()}


def _from_zoo(cfg: ExperimentConfig, progress: Callable[[str], None]) -> Benchmark:
    from vtvc_pyro.zoo import load_zoo, zoo_root

    root = zoo_root(cfg.zoo.preset, cfg.zoo.cache_dir)
    progress(f"zoo '{cfg.zoo.preset}' at {root} (built on first use)")
    zoo = load_zoo(cfg.zoo.preset, cache_dir=cfg.zoo.cache_dir)
    tasks = _chosen_tasks(zoo.task_names, cfg.zoo.tasks)
    splits = {s: {t: zoo.split(t, s) for t in tasks} for s in SPLITS}
    return Benchmark(
        description=f"embedded zoo '{zoo.preset}' ({zoo.model_name})",
        source=str(zoo.root),
        task_names=tasks,
        model=zoo.create_model().eval(),
        heads=HeadBank({t: zoo.heads[t] for t in tasks}),
        splits=_limit(splits, cfg),
        pretrained_path=zoo.pretrained_path,
        finetuned_paths={t: zoo.finetuned_paths[t] for t in tasks},
        input_identity={"zoo": zoo.fingerprint()},
    )


def _from_checkpoints(cfg: ExperimentConfig, pretrained: Path, finetuned: Mapping[str, Path],
                     progress: Callable[[str], None]) -> Benchmark:
    """θ0 from ``zoo.pretrained``, task vectors from ``zoo.finetuned``, heads from ``zoo.heads`` or
    ``zoo.clip``, data from ``zoo.data_root`` preprocessed as the architecture expects."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from vtvc_pyro.checkpoints import create_model
    from vtvc_pyro.standard_tasks import load_standard_tasks

    zoo = cfg.zoo
    progress(f"open_clip {zoo.model}: image encoder from {pretrained}")
    model = create_model(zoo.model, pretrained=pretrained, trust_pickle=zoo.trust_pickle).eval()
    transform = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    tasks = load_standard_tasks(list(finetuned), os.path.expanduser(zoo.data_root), transform)
    if zoo.heads:
        heads = {t: ClassificationHead.load(os.path.expanduser(zoo.heads[t])) for t in finetuned}
    else:
        clip_path = Path(os.path.expanduser(zoo.clip))
        progress(f"zero-shot heads from the text tower of {clip_path}")
        clip = create_model(zoo.model, pretrained=clip_path, trust_pickle=zoo.trust_pickle).eval()
        tokenizer = open_clip.get_tokenizer(zoo.model)
        heads = {t: ClassificationHead.from_text_tower(clip, tokenizer, tasks[t].class_names,
                                                       tasks[t].templates) for t in finetuned}
    return Benchmark(
        description=f"{zoo.model}, {len(finetuned)} task checkpoints",
        source=f"{pretrained}, {len(finetuned)} fine-tuned checkpoints, data in {zoo.data_root}",
        task_names=list(finetuned),
        model=model,
        heads=HeadBank(heads),
        splits={s: {t: tasks[t].split(s) for t in finetuned} for s in SPLITS},
        pretrained_path=pretrained,
        finetuned_paths=dict(finetuned),
        trust_pickle=zoo.trust_pickle,
        input_files={"pretrained": pretrained, **{f"finetuned.{t}": Path(p) for t, p in finetuned.items()},
                     **({f"heads.{t}": Path(os.path.expanduser(zoo.heads[t])) for t in finetuned} if zoo.heads
                        else {"clip": Path(os.path.expanduser(zoo.clip))})},
    )


def _check_file(path: str, key: str) -> Path:
    """A checkpoint file, or a Hugging Face CLIP directory (``save_pretrained`` layout)."""
    resolved = Path(os.path.expanduser(path))
    if not (resolved.is_file() or is_hf_directory(resolved)):
        raise FileNotFoundError(f"{key}: file not found: {resolved} (a checkpoint file or a Hugging Face "
                                "CLIP directory)")
    return resolved


def check_inputs(cfg: ExperimentConfig) -> None:
    """Fail early, naming the key, when a real-checkpoint config points at files that do not exist."""
    zoo = cfg.zoo
    if zoo.preset is not None:
        return
    _check_file(zoo.pretrained, "zoo.pretrained")
    for task in _chosen_tasks(list(zoo.finetuned), zoo.tasks):
        _check_file(zoo.finetuned[task], f"zoo.finetuned.{task}")
        if zoo.heads:
            _check_file(zoo.heads[task], f"zoo.heads.{task}")
    if not zoo.heads:
        _check_file(zoo.clip, "zoo.clip")
    if not Path(os.path.expanduser(zoo.data_root)).is_dir():
        raise FileNotFoundError(f"zoo.data_root: directory not found: {zoo.data_root}")


def load_benchmark(cfg: ExperimentConfig, progress: Callable[[str], None] = print) -> Benchmark:
    """The benchmark a config names (an embedded zoo, or real checkpoints and datasets)."""
    if cfg.zoo.preset is not None:
        return _from_zoo(cfg, progress)
    check_inputs(cfg)
    tasks = _chosen_tasks(list(cfg.zoo.finetuned), cfg.zoo.tasks)
    finetuned = {t: _check_file(cfg.zoo.finetuned[t], f"zoo.finetuned.{t}") for t in tasks}
    bench = _from_checkpoints(cfg, _check_file(cfg.zoo.pretrained, "zoo.pretrained"), finetuned, progress)
    bench.splits = _limit(bench.splits, cfg)
    return bench
