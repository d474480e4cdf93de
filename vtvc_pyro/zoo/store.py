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

import hashlib
import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vtvc_pyro.data import train_val_split
from vtvc_pyro.heads import ClassificationHead, HeadBank
from vtvc_pyro.io import read_json, sha256_file
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


def required_files(manifest: dict) -> list[str]:
    """The files a zoo with this manifest is read from (relative paths)."""
    tasks = list(manifest.get("tasks") or {})
    return [f"{manifest.get('model_name')}.json", "clip.safetensors", "pretrained.safetensors",
            "data/pretrain.safetensors",
            *(f"{kind}/{t}.safetensors" for kind in ("finetuned", "heads", "data") for t in tasks)]


def verify_zoo(root: str | os.PathLike) -> list[str]:
    """Problems that make the zoo at ``root`` unusable (empty list: it is complete and intact).

    Checks the manifest and its format version, and the directory against the manifest both ways: every
    listed file is present with its SHA-256, every file present is listed, every file a zoo is read from
    is listed.
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
    problems = [f"{manifest_path} does not list {rel}" for rel in required_files(manifest)
                if rel not in files]
    for rel, digest in files.items():
        path = root / rel
        if not path.is_file():
            problems.append(f"missing file {path}")
        elif sha256_file(path) != digest:
            problems.append(f"checksum mismatch in {path}")
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir()}
    problems += [f"file {root / rel} is not listed in {MANIFEST}" for rel in sorted(present - set(files))
                 if rel != MANIFEST]
    return problems


_VOLATILE = ("build_seconds", "files", "results", "alpha", "alpha_scores", "pretraining", "finetuning")
"""Manifest entries that describe a build (timings, checksums of file bytes, measured scores), not the
weights or data the results are computed from."""


def _tensor_digest(path: Path) -> dict[str, str]:
    """SHA-256 of each tensor's dtype, shape and bytes (independent of the file's header layout)."""
    digests = {}
    with safe_open(str(path), framework="pt") as f:
        for key in sorted(f.keys()):  # noqa: SIM118 (safe_open has no __iter__)
            t = f.get_tensor(key).contiguous()
            h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            digests[key] = h.hexdigest()
    return digests


def zoo_fingerprint(root: str | os.PathLike) -> dict[str, Any]:
    """What results computed from the zoo at ``root`` depend on: the format version, the manifest's
    configuration (tasks, class names, templates, splits, model config) and the contents of every
    tensor. A rebuild with bit-identical weights and data gives the same fingerprint, whatever its
    build time or safetensors headers."""
    root = Path(root)
    manifest = json.loads((root / MANIFEST).read_text())
    config = {k: v for k, v in manifest.items() if k not in _VOLATILE}
    tensors = {rel: _tensor_digest(root / rel) for rel in sorted(manifest.get("files", {}))
               if rel.endswith(".safetensors")}
    digest = hashlib.sha256(json.dumps({"config": config, "tensors": tensors}, sort_keys=True).encode())
    return {"format_version": manifest.get("format_version"), "content_sha256": digest.hexdigest()}


class Zoo:
    """Handle on a built zoo directory; files are read lazily."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        manifest_path = self.root / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"not a zoo directory (no {MANIFEST}): {self.root}")
        self.manifest: dict = read_json(manifest_path)
        self.preset: str = self.manifest["preset"]
        self.model_name: str = self.manifest["model_name"]
        self.task_names: list[str] = list(self.manifest["tasks"])
        self.image_mean: list[float] = self.manifest["image_mean"]
        self.image_std: list[float] = self.manifest["image_std"]
        self._data: dict[str, dict[str, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"Zoo(preset={self.preset!r}, tasks={self.task_names}, root='{self.root}')"

    def fingerprint(self) -> dict[str, Any]:
        """See :func:`zoo_fingerprint`."""
        return zoo_fingerprint(self.root)

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
