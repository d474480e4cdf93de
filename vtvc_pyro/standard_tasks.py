"""The 8 standard task-vector datasets (Cars, DTD, EuroSAT, GTSRB, MNIST, RESISC45, SUN397, SVHN) from a
local data root, in the layouts mlfoundations/task_vectors uses, with CLIP's class names and templates.

Nothing is downloaded: a missing dataset raises :class:`MissingDatasetError` naming every missing path
and the layout it must have. Val follows the papers: EuroSAT's ``EuroSAT_splits/val`` folder when it exists,
otherwise a seed-0 random 10 % of train (≤ 5000 images), removed from train.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from vtvc_pyro.data import train_val_split

log = logging.getLogger(__name__)

STANDARD_TASKS = ("Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SUN397", "SVHN")

DIGITS = [str(d) for d in range(10)]

# EuroSAT folder names (sorted, as ImageFolder indexes them) → CLIP's class names.
EUROSAT_CLASSES = {
    "AnnualCrop": "annual crop land", "Forest": "forest", "HerbaceousVegetation": "brushland or shrubland",
    "Highway": "highway or road", "Industrial": "industrial buildings or commercial buildings",
    "Pasture": "pasture land", "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings or homes or apartments", "River": "river", "SeaLake": "lake or sea",
}

RESISC45_CLASSES = [
    "airplane", "airport", "baseball_diamond", "basketball_court", "beach", "bridge", "chaparral", "church",
    "circular_farmland", "cloud", "commercial_area", "dense_residential", "desert", "forest", "freeway",
    "golf_course", "ground_track_field", "harbor", "industrial_area", "intersection", "island", "lake",
    "meadow", "medium_residential", "mobile_home_park", "mountain", "overpass", "palace", "parking_lot",
    "railway", "railway_station", "rectangular_farmland", "river", "roundabout", "runway", "sea_ice", "ship",
    "snowberg", "sparse_residential", "stadium", "storage_tank", "tennis_court", "terrace",
    "thermal_power_station", "wetland",
]

# CLIP's GTSRB prompts (openai/CLIP data/prompts.md), in class-id order.
GTSRB_CLASSES = [
    "red and white circle 20 kph speed limit", "red and white circle 30 kph speed limit",
    "red and white circle 50 kph speed limit", "red and white circle 60 kph speed limit",
    "red and white circle 70 kph speed limit", "red and white circle 80 kph speed limit",
    "end / de-restriction of 80 kph speed limit", "red and white circle 100 kph speed limit",
    "red and white circle 120 kph speed limit", "red and white circle red car and black car no passing",
    "red and white circle red truck and black car no passing",
    "red and white triangle road intersection warning",
    "white and yellow diamond priority road", "red and white upside down triangle yield right-of-way", "stop",
    "empty red and white circle", "red and white circle no truck entry",
    "red circle with white horizonal stripe no entry", "red and white triangle with exclamation mark warning",
    "red and white triangle with black left curve approaching warning",
    "red and white triangle with black right curve approaching warning",
    "red and white triangle with black double curve approaching warning",
    "red and white triangle rough / bumpy road warning",
    "red and white triangle car skidding / slipping warning",
    "red and white triangle with merging / narrow lanes warning",
    "red and white triangle with person digging / construction / road work warning",
    "red and white triangle with traffic light approaching warning",
    "red and white triangle with person walking warning",
    "red and white triangle with child and person walking warning",
    "red and white triangle with bicyle warning",
    "red and white triangle with snowflake / ice warning", "red and white triangle with deer warning",
    "white circle with gray strike bar no speed limit", "blue circle with white right turn arrow mandatory",
    "blue circle with white left turn arrow mandatory", "blue circle with white forward arrow mandatory",
    "blue circle with white forward or right turn arrow mandatory",
    "blue circle with white forward or left turn arrow mandatory",
    "blue circle with white keep right arrow mandatory", "blue circle with white keep left arrow mandatory",
    "blue circle with white arrows indicating a traffic circle",
    "white circle with gray strike bar indicating no passing for cars has ended",
    "white circle with gray strike bar indicating no passing for trucks has ended",
]

TEMPLATES: dict[str, list[str]] = {
    "Cars": ["a photo of a {}.", "a photo of the {}.", "a photo of my {}.", "i love my {}!",
             "a photo of my dirty {}.", "a photo of my clean {}.", "a photo of my new {}.",
             "a photo of my old {}."],
    "DTD": ["a photo of a {} texture.", "a photo of a {} pattern.", "a photo of a {} thing.",
            "a photo of a {} object.", "a photo of the {} texture.", "a photo of the {} pattern.",
            "a photo of the {} thing.", "a photo of the {} object."],
    "EuroSAT": ["a centered satellite photo of {}.", "a centered satellite photo of a {}.",
                "a centered satellite photo of the {}."],
    "GTSRB": ['a zoomed in photo of a "{}" traffic sign.', 'a centered photo of a "{}" traffic sign.',
              'a close up photo of a "{}" traffic sign.'],
    "MNIST": ['a photo of the number: "{}".'],
    "RESISC45": [f"{kind} {view} of {article}{{}}." for article in ("", "a ", "the ")
                 for kind, view in (("satellite", "imagery"), ("aerial", "imagery"), ("satellite", "photo"),
                                    ("aerial", "photo"), ("satellite", "view"), ("aerial", "view"))],
    "SUN397": ["a photo of a {}.", "a photo of the {}."],
    "SVHN": ['a photo of the number: "{}".'],
}

# Paths (relative to the data root) each dataset needs; a trailing "/" marks a directory.
LAYOUTS: dict[str, list[str]] = {
    "Cars": ["stanford_cars/devkit/cars_meta.mat", "stanford_cars/devkit/cars_train_annos.mat",
             "stanford_cars/cars_train/", "stanford_cars/cars_test_annos_withlabels.mat",
             "stanford_cars/cars_test/"],
    "DTD": ["dtd/train/", "dtd/val/"],
    "EuroSAT": ["EuroSAT_splits/train/", "EuroSAT_splits/test/"],
    "GTSRB": ["gtsrb/GTSRB/Training/", "gtsrb/GTSRB/Final_Test/Images/", "gtsrb/GT-final_test.csv"],
    "MNIST": ["MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/train-labels-idx1-ubyte",
              "MNIST/raw/t10k-images-idx3-ubyte", "MNIST/raw/t10k-labels-idx1-ubyte"],
    "RESISC45": ["resisc45/NWPU-RESISC45/", "resisc45/resisc45-train.txt", "resisc45/resisc45-test.txt"],
    "SUN397": ["sun397/train/", "sun397/val/"],
    "SVHN": ["svhn/train_32x32.mat", "svhn/test_32x32.mat"],
}

# Layouts the papers' scripts also accept, tried when the main layout is incomplete.
ALTERNATIVE_LAYOUTS: dict[str, list[str]] = {
    "Cars": ["stanford_cars_folder_based/train/", "stanford_cars_folder_based/test/"],
}

HINTS = {
    "Cars": "Stanford Cars devkit and images, as torchvision.datasets.StanfordCars expects (or the papers' "
            "ImageFolder fallback <root>/stanford_cars_folder_based/{train,test}/<class>/*.jpg)",
    "DTD": "ImageFolder layout <root>/dtd/{train,val}/<class>/*.jpg (val is the test split)",
    "EuroSAT": "ImageFolder layout <root>/EuroSAT_splits/{train,test}/<ClassFolder>/*.jpg (and val/, the "
               "papers' val split, when you have it)",
    "GTSRB": "the GTSRB training folders and final-test images with GT-final_test.csv",
    "MNIST": "the four uncompressed IDX files, as torchvision.datasets.MNIST expects",
    "RESISC45": "<root>/resisc45/NWPU-RESISC45/<class>/*.jpg and the split lists resisc45-{train,test}.txt",
    "SUN397": "ImageFolder layout <root>/sun397/{train,val}/<letter_class>/*.jpg (val is the test split)",
    "SVHN": "the cropped-digit files train_32x32.mat and test_32x32.mat",
}


class MissingDatasetError(FileNotFoundError):
    """A standard dataset is not (completely) present under the data root."""


@dataclass
class StandardTask:
    """One dataset's class names, prompt templates and train / val / test splits."""

    name: str
    class_names: list[str]
    templates: list[str]
    train: Dataset
    val: Dataset
    test: Dataset

    def split(self, split: str) -> Dataset:
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown split {split!r}; choose train, val or test")
        return getattr(self, split)


def check_layout(name: str, root: str | os.PathLike) -> None:
    """Raise :class:`MissingDatasetError` listing every path of ``name``'s layout missing under ``root``."""
    if name not in LAYOUTS:
        raise KeyError(f"unknown standard dataset {name!r}; choose one of {list(STANDARD_TASKS)}")
    root = Path(root).expanduser()
    missing = _missing(root, LAYOUTS[name])
    if missing and name in ALTERNATIVE_LAYOUTS and not _missing(root, ALTERNATIVE_LAYOUTS[name]):
        return
    if missing:
        expected = "\n".join(f"  {root / rel}" for rel in LAYOUTS[name])
        raise MissingDatasetError(
            f"dataset {name} is missing under data root {root}: "
            + ", ".join(str(p) for p in missing)
            + f"\nIt needs {HINTS[name]}:\n{expected}\nNothing is downloaded; place the files there."
        )


def _missing(root: Path, layout: list[str]) -> list[Path]:
    return [root / rel for rel in layout
            if not ((root / rel).is_dir() if rel.endswith("/") else (root / rel).is_file())]


def _image_folder(path: Path, transform, is_valid_file=None) -> Dataset:
    from torchvision.datasets import ImageFolder

    return ImageFolder(str(path), transform=transform, is_valid_file=is_valid_file)


def _folder_classes(dataset: Dataset, rename: Callable[[str], str]) -> list[str]:
    return [rename(c) for c in dataset.classes]


def _load_raw(name: str, root: Path, transform) -> tuple[Dataset, Dataset, list[str]]:
    """The official train and test sets and the class names of one dataset."""
    import torchvision.datasets as tvd

    if name == "Cars" and _missing(root, LAYOUTS["Cars"]):  # the papers' folder-based fallback
        base = root / "stanford_cars_folder_based"
        train = _image_folder(base / "train", transform)
        return train, _image_folder(base / "test", transform), _folder_classes(
            train, lambda c: c.replace("_", " "))

    if name == "MNIST":
        return (tvd.MNIST(str(root), train=True, transform=transform, download=False),
                tvd.MNIST(str(root), train=False, transform=transform, download=False), list(DIGITS))
    if name == "SVHN":
        return (tvd.SVHN(str(root / "svhn"), split="train", transform=transform, download=False),
                tvd.SVHN(str(root / "svhn"), split="test", transform=transform, download=False), list(DIGITS))
    if name == "GTSRB":
        return (tvd.GTSRB(str(root), split="train", transform=transform, download=False),
                tvd.GTSRB(str(root), split="test", transform=transform, download=False), list(GTSRB_CLASSES))
    if name == "Cars":
        train = tvd.StanfordCars(str(root), split="train", transform=transform, download=False)
        test = tvd.StanfordCars(str(root), split="test", transform=transform, download=False)
        return train, test, [c.replace("_", " ") for c in train.classes]
    if name == "DTD":
        train = _image_folder(root / "dtd" / "train", transform)
        return train, _image_folder(root / "dtd" / "val", transform), _folder_classes(
            train, lambda c: c.replace("_", " "))
    if name == "SUN397":
        train = _image_folder(root / "sun397" / "train", transform)
        return train, _image_folder(root / "sun397" / "val", transform), _folder_classes(
            train, lambda c: c[2:].replace("_", " "))
    if name == "EuroSAT":
        train = _image_folder(root / "EuroSAT_splits" / "train", transform)
        unknown = [c for c in train.classes if c not in EUROSAT_CLASSES]
        if unknown:
            raise ValueError(f"EuroSAT class folders {unknown} under {root / 'EuroSAT_splits'} are not among "
                             f"{list(EUROSAT_CLASSES)}")
        return (train, _image_folder(root / "EuroSAT_splits" / "test", transform),
                [EUROSAT_CLASSES[c] for c in train.classes])
    if name == "RESISC45":
        base = root / "resisc45"

        def in_split(split: str) -> Callable[[str], bool]:
            names = {line.strip() for line in (base / f"resisc45-{split}.txt").read_text().splitlines()}
            return lambda path: os.path.basename(path) in names

        folder = base / "NWPU-RESISC45"
        train = _image_folder(folder, transform, in_split("train"))
        if train.classes != RESISC45_CLASSES:
            raise ValueError(f"RESISC45 class folders under {folder} differ from the 45 standard classes")
        test = _image_folder(folder, transform, in_split("test"))
        return train, test, [c.replace("_", " ") for c in train.classes]
    raise KeyError(f"unknown standard dataset {name!r}; choose one of {list(STANDARD_TASKS)}")


def load_standard_task(
    name: str,
    data_root: str | os.PathLike,
    transform: Callable | None = None,
    val_fraction: float = 0.1,
    max_val: int = 5000,
    seed: int = 0,
) -> StandardTask:
    """Load one of :data:`STANDARD_TASKS` from ``data_root`` (``transform``: e.g. open_clip's preprocess)."""
    check_layout(name, data_root)
    root = Path(data_root).expanduser()
    train_full, test, class_names = _load_raw(name, root, transform)
    val_folder = root / "EuroSAT_splits" / "val"
    if name == "EuroSAT" and val_folder.is_dir():
        val = _image_folder(val_folder, transform)
        if val.classes != train_full.classes:
            raise ValueError(f"EuroSAT class folders differ between {val_folder} ({val.classes}) and train "
                             f"({train_full.classes})")
        return StandardTask(name, class_names, list(TEMPLATES[name]), train_full, val, test)
    if name == "EuroSAT":
        log.warning("EuroSAT: %s does not exist, so val is a seed-%d random %.0f %% of train; the papers' "
                    "checkpoints were fine-tuned on all of EuroSAT_splits/train, so this val overlaps their "
                    "fine-tuning data", val_folder, seed, 100 * val_fraction)
    train, val = train_val_split(train_full, val_fraction, max_val, seed)
    return StandardTask(name, class_names, list(TEMPLATES[name]), train, val, test)


def standard_class_names(name: str, data_root: str | os.PathLike | None = None) -> list[str]:
    """CLIP's class names of a standard dataset, in label order. MNIST, SVHN, GTSRB, EuroSAT and RESISC45
    have fixed ones; Cars, DTD and SUN397 take theirs from the data (``data_root``)."""
    fixed = {"MNIST": DIGITS, "SVHN": DIGITS, "GTSRB": GTSRB_CLASSES,
             "EuroSAT": [EUROSAT_CLASSES[c] for c in sorted(EUROSAT_CLASSES)],
             "RESISC45": [c.replace("_", " ") for c in RESISC45_CLASSES]}
    if name in fixed:
        return list(fixed[name])
    if name not in STANDARD_TASKS:
        raise KeyError(f"unknown standard dataset {name!r}; choose one of {list(STANDARD_TASKS)}")
    if data_root is None:
        raise ValueError(f"{name}'s class names come from its data: give the data root (--data-root) or the "
                         "class names (--class-names)")
    check_layout(name, data_root)
    return _load_raw(name, Path(data_root).expanduser(), None)[2]


def load_standard_tasks(names: Sequence[str], data_root: str | os.PathLike,
                        transform: Callable | None = None) -> dict[str, StandardTask]:
    """Several standard tasks; checks every layout first so one error lists all missing datasets."""
    problems = []
    for name in names:
        try:
            check_layout(name, data_root)
        except MissingDatasetError as err:
            problems.append(str(err))
    if problems:
        raise MissingDatasetError("\n\n".join(problems))
    return {name: load_standard_task(name, data_root, transform) for name in names}
