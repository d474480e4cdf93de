"""The files a real user of ``experiments/configs/vit_b32_task_addition.yaml`` has, made up: random-init
ViT-B-32 (QuickGELU, as OpenAI CLIP) image encoders pickled as the task-vector papers' ``ImageEncoder``
modules (θ0 and eight fine-tuned θ0 + noise), a full CLIP state dict, and tiny datasets in the eight on-disk
layouts ``vtvc_pyro.standard_tasks`` documents (tests/test_real_user.py)."""

from __future__ import annotations

import csv
import struct
import sys
import types
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file
from scipy.io import savemat

from vtvc_pyro.standard_tasks import EUROSAT_CLASSES, RESISC45_CLASSES, STANDARD_TASKS

MODEL = "ViT-B-32-quickgelu"
RNG = np.random.default_rng(0)


def _image(path: Path, size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)


def _pickled_image_encoder(model: torch.nn.Module, path: Path) -> None:
    """``torch.save`` of a whole ``src.modeling.ImageEncoder`` (the CLIP model without its text
    transformer), as mlfoundations/task_vectors and aTLAS publish their checkpoints."""
    src, modeling = types.ModuleType("src"), types.ModuleType("src.modeling")

    class ImageEncoder(torch.nn.Module):
        def __init__(self, clip: torch.nn.Module):
            super().__init__()
            self.model = clip

    ImageEncoder.__module__, ImageEncoder.__qualname__ = "src.modeling", "ImageEncoder"
    modeling.ImageEncoder, src.modeling = ImageEncoder, modeling
    sys.modules.update({"src": src, "src.modeling": modeling})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ImageEncoder(model), path)
    finally:
        del sys.modules["src"], sys.modules["src.modeling"]


def write_checkpoints(root: Path) -> None:
    """``checkpoints/ViT-B-32/{zeroshot.pt, <Task>/finetuned.pt, openai_clip.safetensors}``."""
    torch.manual_seed(0)
    clip = open_clip.create_model(MODEL, pretrained=None).eval()
    folder = root / "checkpoints" / "ViT-B-32"
    folder.mkdir(parents=True, exist_ok=True)
    full = {k: v.contiguous() for k, v in clip.state_dict().items()}
    save_file(full, str(folder / "openai_clip.safetensors"))
    encoder = open_clip.create_model(MODEL, pretrained=None).eval()
    encoder.load_state_dict(clip.state_dict())
    del encoder.transformer  # the papers' ImageEncoder drops the text transformer (keep_lang=False)
    theta0 = {k: v.clone() for k, v in encoder.visual.state_dict().items()}
    _pickled_image_encoder(encoder, folder / "zeroshot.pt")
    for t, task in enumerate(STANDARD_TASKS):
        g = torch.Generator().manual_seed(t + 1)
        encoder.visual.load_state_dict({k: v + 0.002 * torch.randn(v.shape, generator=g)
                                        if v.is_floating_point() else v for k, v in theta0.items()})
        _pickled_image_encoder(encoder, folder / task / "finetuned.pt")


def _idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed IDX file (MNIST): magic 0x08 (ubyte), the number of dimensions, the sizes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_datasets(root: Path, train: int = 20, test: int = 4) -> None:
    """Tiny datasets under ``root/data`` in the eight layouts (``train`` images per split where the layout
    allows, at least one per class where a folder per class must hold one)."""
    data = root / "data"
    for n, prefix in ((train, "train"), (test, "t10k")):  # MNIST
        _idx(data / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte", RNG.integers(0, 255, (n, 28, 28)))
        _idx(data / "MNIST" / "raw" / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    for split, n in (("train", train), ("test", test)):  # SVHN: X [32, 32, 3, N], y in 1..10 (10 is digit 0)
        (data / "svhn").mkdir(parents=True, exist_ok=True)
        pixels = RNG.integers(0, 255, (32, 32, 3, n), dtype=np.uint8)
        savemat(data / "svhn" / f"{split}_32x32.mat", {"X": pixels, "y": (np.arange(n) % 10 + 1)[:, None]})
    gtsrb = data / "gtsrb"  # a folder of .ppm per class (all 43), test images listed in GT-final_test.csv
    for c in range(43):
        _image(gtsrb / "GTSRB" / "Training" / f"{c:05d}" / f"00000_{c:05d}.ppm")
    rows = [{"Filename": f"{i:05d}.ppm", "ClassId": i % 43} for i in range(test)]
    for row in rows:
        _image(gtsrb / "GTSRB" / "Final_Test" / "Images" / row["Filename"])
    with open(gtsrb / "GT-final_test.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["Filename", "ClassId"], delimiter=";")
        writer.writeheader()
        writer.writerows(rows)
    cars = data / "stanford_cars"  # devkit .mat files; classes are 1-based
    names = np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"],
                     dtype=object)
    (cars / "devkit").mkdir(parents=True, exist_ok=True)
    savemat(cars / "devkit" / "cars_meta.mat", {"class_names": names[None, :]})
    for split, n, annos in (("train", train, cars / "devkit" / "cars_train_annos.mat"),
                            ("test", test, cars / "cars_test_annos_withlabels.mat")):
        records = np.zeros((1, n), dtype=[("fname", object), ("class", np.uint8)])
        for i in range(n):
            records[0, i] = (f"{i:05d}.jpg", i % 3 + 1)
            _image(cars / f"cars_{split}" / f"{i:05d}.jpg")
        savemat(annos, {"annotations": records})
    folders = {"dtd": (["banded", "dotted"], ("train", "val")),
               "EuroSAT_splits": (list(EUROSAT_CLASSES)[:3], ("train", "test")),
               "sun397": (["a_abbey", "b_bakery"], ("train", "val"))}
    for name, (classes, (train_dir, test_dir)) in folders.items():
        for directory, n in ((train_dir, train), (test_dir, test)):
            for i in range(n):
                _image(data / name / directory / classes[i % len(classes)] / f"{i}.jpg")
    resisc = data / "resisc45"  # one folder per class (all 45) and the split lists
    listed = {"train": [], "test": []}
    for c, cls in enumerate(RESISC45_CLASSES):
        for split in ("train", "test"):
            name = f"{cls}_{split}_{c}.jpg"
            _image(resisc / "NWPU-RESISC45" / cls / name)
            listed[split].append(name)
    for split, names_ in listed.items():
        (resisc / f"resisc45-{split}.txt").write_text("\n".join(names_) + "\n")


def write_user_files(root: Path) -> None:
    write_checkpoints(root)
    write_datasets(root)
