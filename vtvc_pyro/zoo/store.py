"""A built zoo on disk: the cache location, integrity checks, and the :class:`Zoo` handle.

Layout of a zoo directory (what a real user of the task-vector papers has, in safetensors)::

    zoo.json                    config, tasks, class names, templates, split sizes and seeds, accuracies,
                                SHA-256 of every other file
    <model_name>.json           the open_clip architecture
    clip.safetensors            the full pre-trained CLIP (text tower included)
    pretrained.safetensors      θ0: the image encoder, keyed like ``model.visual.state_dict()``
    finetuned/<task>.safetensors, heads/<task>.safetensors
    data/<task>.safetensors     uint8 train / test images and labels; data/pretrain.safetensors
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path

import torch
from safetensors.torch import load_file

from vtvc_pyro.data import train_val_split
from vtvc_pyro.heads import ClassificationHead, HeadBank
from vtvc_pyro.io import sha256_file
from vtvc_pyro.zoo.dataset import ImageSplit
from vtvc_pyro.zoo.presets import FORMAT_VERSION

MANIFEST = "zoo.json"
SPLITS = ("train", "val", "test")


def default_cache_dir() -> Path:
    """``$VTVC_CACHE_DIR`` if set, else the platform's user cache directory for ``vtvc_pyro``."""
    if os.environ.get("VTVC_CACHE_DIR"):
        return Path(os.environ["VTVC_CACHE_DIR"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("vtvc_pyro"))


def zoo_root(preset: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the zoo of ``preset`` lives: keyed by preset and format version."""
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / "zoo" / f"{preset}-v{FORMAT_VERSION}"


def verify_zoo(root: str | os.PathLike) -> list[str]:
    """Problems that make the zoo at ``root`` unusable (empty list: it is complete and intact).

    Checks the manifest, its format version, and the presence and SHA-256 of every listed file.
    """
    root = Path(root)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        return [f"missing file {manifest_path}"]
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return [f"unreadable manifest {manifest_path}: {err}"]
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        return [f"{manifest_path} has format version {version!r}, expected {FORMAT_VERSION}"]
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return [f"{manifest_path} lists no files"]
    problems = []
    for rel, digest in files.items():
        path = root / rel
        if not path.is_file():
            problems.append(f"missing file {path}")
        elif sha256_file(path) != digest:
            problems.append(f"checksum mismatch in {path}")
    return problems


class Zoo:
    """Handle on a built zoo directory; files are read lazily."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"not a zoo directory (no {MANIFEST}): {self.root}")
        self.manifest: dict = json.loads(manifest_path.read_text())
        self.preset: str = self.manifest["preset"]
        self.model_name: str = self.manifest["model_name"]
        self.task_names: list[str] = list(self.manifest["tasks"])
        self.image_mean: list[float] = self.manifest["image_mean"]
        self.image_std: list[float] = self.manifest["image_std"]
        self._data: dict[str, dict[str, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"Zoo(preset={self.preset!r}, tasks={self.task_names}, root='{self.root}')"

    @property
    def config_path(self) -> Path:
        return self.root / f"{self.model_name}.json"

    @property
    def clip_path(self) -> Path:
        return self.root / "clip.safetensors"

    @property
    def pretrained_path(self) -> Path:
        return self.root / "pretrained.safetensors"

    @property
    def finetuned_paths(self) -> dict[str, Path]:
        return {t: self.root / "finetuned" / f"{t}.safetensors" for t in self.task_names}

    @property
    def head_paths(self) -> dict[str, Path]:
        return {t: self.root / "heads" / f"{t}.safetensors" for t in self.task_names}

    @cached_property
    def heads(self) -> HeadBank:
        """The tasks' frozen zero-shot heads, in task order."""
        return HeadBank({t: ClassificationHead.load(p) for t, p in self.head_paths.items()})

    def create_model(self) -> torch.nn.Module:
        """The pre-trained tiny CLIP (both towers) as an open_clip model in eval mode."""
        from vtvc_pyro.checkpoints import create_model, register_model_config

        return create_model(register_model_config(self.config_path), pretrained=self.clip_path).eval()

    def tokenizer(self):
        """open_clip's tokenizer for this zoo's model (bundled BPE, offline)."""
        import open_clip

        from vtvc_pyro.checkpoints import register_model_config

        return open_clip.get_tokenizer(register_model_config(self.config_path))

    def _task_data(self, task: str) -> dict[str, torch.Tensor]:
        if task not in self.task_names:
            raise KeyError(f"unknown task {task!r}; this zoo has {self.task_names}")
        if task not in self._data:
            self._data[task] = load_file(str(self.root / "data" / f"{task}.safetensors"))
        return self._data[task]

    def split(self, task: str, split: str) -> ImageSplit:
        """``train`` (official train minus val), ``val`` (seed-0 10 % of train, ≤ 5000) or ``test``."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        data = self._task_data(task)
        prefix = "test" if split == "test" else "train"
        full = ImageSplit(data[f"{prefix}_images"], data[f"{prefix}_labels"], self.image_mean, self.image_std)
        if split == "test":
            return full
        protocol = self.manifest["split_protocol"]
        train, val = train_val_split(full, protocol["val_fraction"], protocol["max_val"], protocol["seed"])
        return full.subset((train if split == "train" else val).indices)

    def pretraining_images(self) -> torch.Tensor:
        """The uint8 ``[N, 3, H, W]`` images the tiny CLIP was pre-trained on."""
        return load_file(str(self.root / "data" / "pretrain.safetensors"))["images"]

    def bank(self, blocks="tensor", dtype: torch.dtype | str = torch.float32):
        """The task vectors ``θ_t − θ0`` of all tasks as a :class:`~vtvc_pyro.task_vectors.TaskVectorBank`."""
        from vtvc_pyro.task_vectors import TaskVectorBank

        return TaskVectorBank.from_checkpoints(self.pretrained_path, self.finetuned_paths, blocks=blocks,
                                               dtype=dtype)

    def accuracy(self, method: str, split: str = "test") -> dict[str, float]:
        """Recorded per-task accuracy of a baseline (``zeroshot``, ``finetuned``, ``task_arithmetic``,
        ``ties``) on ``val`` or ``test``."""
        results = self.manifest.get("results", {}).get(split, {})
        if method not in results:
            raise KeyError(f"no recorded {split} results for {method!r}; have {sorted(results)}")
        return {t: float(m["accuracy"]) for t, m in results[method].items()}
