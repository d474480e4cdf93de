"""Data-loading throughput: the former item-by-item collation in the training process against the
DataLoader passes (in process, and with worker processes), over JPEG files decoded and transformed as
open_clip preprocesses them (224 px), in interleaved rounds; images/s and the ratio to the item-by-item path.

    .venv/bin/python benchmarks/data_loading.py --images 256 --batch-size 64 --workers 2 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from open_clip.transform import image_transform
from PIL import Image
from torch.utils.data import Dataset

from vtvc_pyro.data import LoaderConfig, MultiTaskDataset, StepBatchSampler, batch_loader


class JpegFolder(Dataset):
    """``(image, label)`` from JPEG files, decoded and transformed per item (what a real task does)."""

    def __init__(self, paths: list[Path]):
        self.paths, self.transform = paths, image_transform(224, is_train=False)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB")), i % 10


def item_by_item(data: Dataset, sampler: StepBatchSampler) -> int:
    """The former path: ``torch.stack`` of ``data[i]`` in the training process, batch after batch."""
    n = 0
    for positions in sampler:
        items = [data[i] for i in positions]
        images = torch.stack([torch.as_tensor(item[1]) for item in items])
        torch.tensor([int(item[2]) for item in items])
        n += images.shape[0]
    return n


def through_loader(data: Dataset, sampler: StepBatchSampler, workers: int) -> int:
    return sum(images.shape[0] for _, images, _, _ in batch_loader(data, sampler, LoaderConfig(workers)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.images):  # photo-sized JPEGs (smooth noise compresses like a photo)
            pixels = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
            path = Path(tmp) / f"{i}.jpg"
            Image.fromarray(pixels).resize((500, 400), Image.BILINEAR).save(path, quality=90)
            paths.append(path)
        data = MultiTaskDataset({"jpeg": JpegFolder(paths)}, ["jpeg"])
        steps = args.images // args.batch_size
        sampler = StepBatchSampler(len(data), args.batch_size, seed=0, start=0, stop=steps)
        methods = {"item-by-item (before)": lambda: item_by_item(data, sampler),
                   "DataLoader, 0 workers": lambda: through_loader(data, sampler, 0),
                   f"DataLoader, {args.workers} workers": lambda: through_loader(data, sampler, args.workers)}
        times: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(args.rounds):
            for name, fn in methods.items():
                start = time.perf_counter()
                n = fn()
                times[name].append(time.perf_counter() - start)
    before = statistics.median(times["item-by-item (before)"])
    print(f"{n} JPEG images (500x400 -> 224 px), batch {args.batch_size}, median of {args.rounds} rounds")
    print("| path | s | images/s | vs before |\n|---|---:|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {n / median:.0f} | {before / median:.2f}x |")


if __name__ == "__main__":
    main()
