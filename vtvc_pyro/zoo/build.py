"""Building and caching the zoo: tasks → pre-trained tiny CLIP → zero-shot heads → fine-tuned encoders →
baselines → ``zoo.json``. Built in a temporary directory and renamed into the cache when complete.

Builds of one preset are serialised by a lock file next to the zoo (``.<preset>-v<N>.lock``): a second
process waits, then uses the zoo the first one built. A valid zoo in place is never deleted except by
``force``, and then only after its replacement is complete (moved aside and swapped by renames)."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import filelock
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from vtvc_pyro.device import torch_threads
from vtvc_pyro.heads import ClassificationHead
from vtvc_pyro.io import WriteError, atomic_path, permissions, sha256_file, write_json
from vtvc_pyro.zoo.baselines import evaluate_baselines
from vtvc_pyro.zoo.dataset import ImageSplit
from vtvc_pyro.zoo.presets import FORMAT_VERSION, ZooPreset, get_preset
from vtvc_pyro.zoo.store import MANIFEST, Zoo, verify_zoo, zoo_root
from vtvc_pyro.zoo.tasks import TaskImages, build_task, content_hash
from vtvc_pyro.zoo.training import finetune_encoder, pretrain_clip

BUILD_THREADS = 2  # torch threads of every build (float sums depend on it); the committed results used 2


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Seed torch and switch on deterministic algorithms for the block, restoring the previous mode."""
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _pretraining_pool(tasks: dict[str, TaskImages]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate the tasks' pre-training images, dropping any whose pixels equal a task image
    (so pre-training never sees an evaluation image, even a duplicate)."""
    held_out = {content_hash(img) for t in tasks.values() for split in (t.train, t.test) for img in split[0]}
    images, labels, task_ids = [], [], []
    for k, task in enumerate(tasks.values()):
        for img, label in zip(*task.pretrain, strict=True):
            if content_hash(img) not in held_out:
                images.append(img)
                labels.append(int(label))
                task_ids.append(k)
    if not images:
        raise ValueError(f"no task of {list(tasks)} contributes pre-training images")
    return torch.stack(images), torch.tensor(labels), torch.tensor(task_ids)


def _captions(tasks: dict[str, TaskImages], labels: torch.Tensor, task_ids: torch.Tensor):
    """Distinct captions (templates × class names) and, per pre-training image, its caption ids."""
    texts: list[str] = []
    index: dict[tuple[int, int], list[int]] = {}
    for k, task in enumerate(tasks.values()):
        for c, name in enumerate(task.class_names):
            index[(k, c)] = list(range(len(texts), len(texts) + len(task.templates)))
            texts.extend(template.format(name) for template in task.templates)
    return texts, [index[(int(k), int(c))] for k, c in zip(task_ids, labels, strict=True)]


def _tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    tokens = tokenizer(texts)
    full = tokens[:, -1] != 0
    if full.any():
        raise ValueError(f"caption {texts[int(full.nonzero()[0])]!r} does not fit the text context "
                         f"length {tokens.shape[1]}")
    return tokens


def _write_task_data(root: Path, preset: ZooPreset) -> tuple[dict[str, TaskImages], torch.Tensor,
                                                               torch.Tensor, torch.Tensor]:
    """Cut every task's images, save them and the pre-training pool under ``root/data``."""
    tasks = {t: build_task(t, counts, preset.image_size, preset.seed) for t, counts in preset.tasks.items()}
    for t, task in tasks.items():
        _save_tensors({"train_images": task.train[0], "train_labels": task.train[1],
                       "test_images": task.test[0], "test_labels": task.test[1]},
                      root / "data" / f"{t}.safetensors", {"source": task.source})
    pool, labels, task_ids = _pretraining_pool(tasks)
    _save_tensors({"images": pool, "labels": labels, "task_ids": task_ids},
                  root / "data" / "pretrain.safetensors", {"tasks": json.dumps(list(tasks))})
    return tasks, pool, labels, task_ids


def _write_zoo(root: Path, preset: ZooPreset) -> None:
    """Build every file of the zoo into ``root`` (an empty directory)."""
    import open_clip

    from vtvc_pyro.checkpoints import create_model, register_model_config, save_state_dict

    start = time.perf_counter()
    config_text = (resources.files("vtvc_pyro") / "model_configs" / f"{preset.model_name}.json").read_text()
    (root / f"{preset.model_name}.json").write_text(config_text)
    name = register_model_config(root / f"{preset.model_name}.json")

    with deterministic(preset.seed), tqdm(total=4 + len(preset.tasks), desc=f"zoo '{preset.name}'",
                                          unit="step") as steps:
        tasks, pool, pool_labels, pool_tasks = _write_task_data(root, preset)
        steps.set_postfix_str("tasks")
        steps.update()

        model = create_model(name)
        mean, std = list(model.visual.image_mean), list(model.visual.image_std)
        pixels = ImageSplit(pool, pool_labels, mean, std)
        tokenizer = open_clip.get_tokenizer(name)
        texts, options = _captions(tasks, pool_labels, pool_tasks)
        pretrain_loss = pretrain_clip(model, pixels.tensors()[0], _tokenize(tokenizer, texts), options,
                                      preset.pretrain, preset.seed)
        save_state_dict(model.state_dict(), root / "clip.safetensors")
        save_state_dict(model.visual.state_dict(), root / "pretrained.safetensors")
        steps.set_postfix_str("pre-trained CLIP")
        steps.update()

        heads = {t: ClassificationHead.from_text_tower(model, tokenizer, task.class_names, task.templates)
                 for t, task in tasks.items()}
        for t, head in heads.items():
            head.save(root / "heads" / f"{t}.safetensors")
        steps.set_postfix_str("zero-shot heads")
        steps.update()

        manifest = {
            "format_version": FORMAT_VERSION,
            "preset": preset.name,
            "model_name": preset.model_name,
            "model_config": json.loads(config_text),
            "image_size": preset.image_size,
            "image_mean": mean,
            "image_std": std,
            "seed": preset.seed,
            "split_protocol": {"val_fraction": preset.val_fraction, "max_val": preset.max_val,
                               "seed": preset.val_seed},
            "tasks": {t: {"source": task.source, "class_names": task.class_names, "templates": task.templates}
                      for t, task in tasks.items()},
            "preset_config": preset.to_dict(),
        }
        write_json(root / MANIFEST, manifest)
        zoo = Zoo(root)  # reads the splits back exactly as users will

        finetune_losses = {}
        for k, t in enumerate(zoo.task_names):
            visual = copy.deepcopy(model.visual)
            images, labels = zoo.split(t, "train").tensors()
            finetune_losses[t] = finetune_encoder(visual, heads[t], images, labels, preset.finetune,
                                                  preset.seed + 1 + k, desc=f"fine-tune {t}")
            save_state_dict(visual.state_dict(), root / "finetuned" / f"{t}.safetensors")
            steps.set_postfix_str(f"fine-tuned {t}")
            steps.update()

        for t in zoo.task_names:
            manifest["tasks"][t]["sizes"] = {s: len(zoo.split(t, s)) for s in ("train", "val", "test")}
        manifest["pretraining"] = {"images": len(pool), "captions": len(texts), "final_loss": pretrain_loss,
                                   "per_task": {t: int((pool_tasks == k).sum()) for k, t in enumerate(tasks)}}
        manifest["finetuning"] = {"final_loss": finetune_losses}
        manifest.update(evaluate_baselines(zoo, preset.eval_batch_size, preset.ties_top_k,
                                           progress=steps.set_postfix_str))
        steps.update()

    manifest["build_seconds"] = round(time.perf_counter() - start, 1)
    manifest["files"] = {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST
    }
    write_json(root / MANIFEST, manifest)


def build_lock(root: Path) -> filelock.BaseFileLock:
    """The lock that serialises builds of the zoo at ``root`` (a file next to it)."""
    return filelock.FileLock(root.parent / f".{root.name}.lock", is_singleton=True, thread_local=False)


def build_zoo(preset: str = "default", cache_dir: str | os.PathLike | None = None,
              force: bool = False) -> Zoo:
    """Build the zoo of ``preset`` into the cache; an intact cached zoo is returned as is unless ``force``.

    Holds the preset's build lock throughout: a concurrent build waits for this one, then finds the zoo
    intact and returns it.
    """
    config = get_preset(preset)
    root = zoo_root(preset, cache_dir)
    lock = build_lock(root)
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=0)
    except filelock.Timeout:
        warnings.warn(f"another process is building the zoo at {root}; waiting for it", RuntimeWarning,
                      stacklevel=2)
        lock.acquire()
    except OSError as err:
        raise WriteError(f"cannot write the zoo cache {root.parent}: {err.strerror or err}; set "
                         "$VTVC_CACHE_DIR (or --cache-dir) to a writable directory") from err
    try:
        if root.exists() and not force:
            problems = verify_zoo(root)
            if not problems:
                return Zoo(root)
            warnings.warn(f"zoo cache at {root} is invalid ({'; '.join(problems)}); rebuilding it",
                          RuntimeWarning, stacklevel=2)
        staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.building-"))
        os.chmod(staging, permissions(0o777))  # mkdtemp makes it private; the zoo follows the umask
        try:
            # float sums split over another number of threads round differently: a zoo built inside a
            # one-thread run differed from `vtvc zoo build`'s by up to 0.01 (learned methods: 0.9 points)
            with torch_threads(BUILD_THREADS):
                _write_zoo(staging, config)
            _swap_in(staging, root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return Zoo(root)
    finally:
        lock.release()


def _swap_in(staging: Path, root: Path) -> None:
    """Put the complete zoo ``staging`` at ``root``: the previous one is moved aside by a rename first
    (readers see the old zoo or the new one, never a half-deleted one), then removed."""
    if root.exists():
        _discard(root, staging)
    else:
        os.rename(staging, root)


def _discard(path: Path, replacement: Path) -> None:
    """Rename ``path`` aside, rename ``replacement`` in, then delete the old one."""
    trash = path.with_name(f".{path.name}.trash-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(path, trash)
    os.rename(replacement, path)
    shutil.rmtree(trash, ignore_errors=True)


def load_zoo(preset: str = "default", cache_dir: str | os.PathLike | None = None,
             build_if_missing: bool = True) -> Zoo:
    """The cached zoo of ``preset``; built (or rebuilt, with a warning, if damaged) when needed."""
    get_preset(preset)
    root = zoo_root(preset, cache_dir)
    if root.exists():
        problems = verify_zoo(root)
        if not problems:
            return Zoo(root)
        message = f"zoo cache at {root} is invalid ({'; '.join(problems)})"
        if not build_if_missing:
            raise ValueError(f"{message}; rebuild it with `vtvc zoo build --preset {preset} --force`")
        return build_zoo(preset, cache_dir)  # re-checks under the build lock, then rebuilds
    if not build_if_missing:
        raise FileNotFoundError(f"no zoo '{preset}' at {root}; build it with "
                                f"`vtvc zoo build --preset {preset}`")
    return build_zoo(preset, cache_dir)
