"""Loaders of the 8 standard datasets: missing-data errors, fake local layouts, the val protocol, the papers'
EuroSAT val folder and folder-based Cars."""

import logging

import pytest
import torch
from PIL import Image

from vtvc_pyro.data import train_val_split
from vtvc_pyro.standard_tasks import (
    DIGITS,
    LAYOUTS,
    STANDARD_TASKS,
    TEMPLATES,
    MissingDatasetError,
    load_standard_task,
    load_standard_tasks,
    standard_class_names,
)


def _images(folder, count, color):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (4, 4), (color, i, 0)).save(folder / f"img_{color}_{i}.png")


def test_every_standard_task_has_a_layout_and_templates():
    assert sorted(LAYOUTS) == sorted(TEMPLATES) == sorted(STANDARD_TASKS)
    assert len(STANDARD_TASKS) == 8
    assert TEMPLATES["MNIST"] == ['a photo of the number: "{}".']
    assert len(TEMPLATES["RESISC45"]) == 18
    assert TEMPLATES["RESISC45"][:2] == ["satellite imagery of {}.", "aerial imagery of {}."]
    assert TEMPLATES["RESISC45"][7] == "aerial imagery of a {}."
    assert TEMPLATES["RESISC45"][-1] == "aerial view of the {}."


def test_missing_dataset_names_every_missing_path(tmp_path):
    with pytest.raises(MissingDatasetError) as info:
        load_standard_task("SVHN", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "svhn" / "train_32x32.mat") in message
    assert str(tmp_path / "svhn" / "test_32x32.mat") in message
    assert isinstance(info.value, FileNotFoundError)


def test_partial_layout_reports_only_what_is_missing(tmp_path):
    _images(tmp_path / "dtd" / "train" / "banded", 2, 10)
    with pytest.raises(MissingDatasetError) as info:
        load_standard_task("DTD", tmp_path)
    missing_part = str(info.value).split("\n")[0]
    assert str(tmp_path / "dtd" / "val") in missing_part
    assert str(tmp_path / "dtd" / "train") not in missing_part


def test_several_missing_datasets_are_reported_together(tmp_path):
    with pytest.raises(MissingDatasetError) as info:
        load_standard_tasks(["MNIST", "GTSRB"], tmp_path)
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte") in message
    assert str(tmp_path / "gtsrb" / "GT-final_test.csv") in message


def test_unknown_dataset():
    with pytest.raises(KeyError, match="'ImageNet'"):
        load_standard_task("ImageNet", ".")


def test_fake_dtd_loads_with_class_names_and_val_protocol(tmp_path):
    _images(tmp_path / "dtd" / "train" / "banded", 12, 10)
    _images(tmp_path / "dtd" / "train" / "zig_zagged", 8, 20)
    _images(tmp_path / "dtd" / "val" / "banded", 3, 30)
    _images(tmp_path / "dtd" / "val" / "zig_zagged", 3, 40)
    task = load_standard_task("DTD", tmp_path)
    assert task.class_names == ["banded", "zig zagged"]
    assert task.templates[0] == "a photo of a {} texture."
    assert (len(task.train), len(task.val), len(task.test)) == (18, 2, 6)
    # the literature's split: random_split's permutation from manual_seed(0); val is its last 10 %
    expected_val = torch.randperm(20, generator=torch.Generator().manual_seed(0))[18:].tolist()
    assert list(task.val.indices) == expected_val
    assert set(task.train.indices).isdisjoint(task.val.indices)
    image, label = task.split("test")[5]
    assert image.size == (4, 4) and label == 1


def test_fake_eurosat_maps_folders_to_clip_class_names(tmp_path):
    for split in ("train", "test"):
        _images(tmp_path / "EuroSAT_splits" / split / "SeaLake", 2, 1)
        _images(tmp_path / "EuroSAT_splits" / split / "AnnualCrop", 2, 2)
    task = load_standard_task("EuroSAT", tmp_path)
    assert task.class_names == ["annual crop land", "lake or sea"]


def test_val_protocol_caps_at_5000():
    big = list(range(60_000))
    train, val = train_val_split(big)
    assert (len(train), len(val)) == (55_000, 5_000)
    small_train, small_val = train_val_split(list(range(99)))
    assert len(small_val) == 9  # int(9.9)
    again = train_val_split(list(range(99)))[1]
    assert list(small_val.indices) == list(again.indices)


def _eurosat(root, splits):
    for split, count in splits.items():
        _images(root / "EuroSAT_splits" / split / "SeaLake", count, 1)
        _images(root / "EuroSAT_splits" / split / "AnnualCrop", count, 2)


def test_eurosat_val_folder_is_val_and_train_stays_whole(tmp_path, caplog):
    _eurosat(tmp_path, {"train": 6, "val": 2, "test": 3})
    with caplog.at_level(logging.WARNING):
        task = load_standard_task("EuroSAT", tmp_path)
    assert not caplog.records
    assert (len(task.train), len(task.val), len(task.test)) == (12, 4, 6)
    val_files = sorted(path.split("EuroSAT_splits/")[1] for path, _ in task.val.samples)
    assert val_files == sorted(f"val/{c}/img_{k}_{i}.png" for c, k in (("SeaLake", 1), ("AnnualCrop", 2))
                               for i in range(2))
    assert [label for _, label in task.val.samples] == [0, 0, 1, 1]  # AnnualCrop, SeaLake as in train
    assert task.class_names == ["annual crop land", "lake or sea"]


def test_eurosat_without_val_folder_splits_train_with_a_warning(tmp_path, caplog):
    _eurosat(tmp_path, {"train": 10, "test": 3})
    with caplog.at_level(logging.WARNING):
        task = load_standard_task("EuroSAT", tmp_path)
    assert (len(task.train), len(task.val)) == (18, 2)
    expected = torch.randperm(20, generator=torch.Generator().manual_seed(0))[18:].tolist()
    assert list(task.val.indices) == expected
    assert any("EuroSAT_splits/val does not exist" in r.getMessage() and "overlaps" in r.getMessage()
               for r in caplog.records)


def test_eurosat_val_folder_with_other_classes_is_refused(tmp_path):
    _eurosat(tmp_path, {"train": 2, "test": 1})
    _images(tmp_path / "EuroSAT_splits" / "val" / "Forest", 1, 3)
    with pytest.raises(ValueError, match=r"EuroSAT class folders differ between .*val \(\['Forest'\]\)"):
        load_standard_task("EuroSAT", tmp_path)


def test_cars_folder_based_fallback(tmp_path):
    with pytest.raises(MissingDatasetError, match="stanford_cars_folder_based"):
        load_standard_task("Cars", tmp_path)
    base = tmp_path / "stanford_cars_folder_based"
    for split, count in (("train", 10), ("test", 2)):
        _images(base / split / "Audi_S4_Sedan_2012", count, 5)
        _images(base / split / "BMW_M3_Coupe_2012", count, 6)
    task = load_standard_task("Cars", tmp_path)
    assert task.class_names == ["Audi S4 Sedan 2012", "BMW M3 Coupe 2012"]
    assert (len(task.train), len(task.val), len(task.test)) == (18, 2, 4)
    assert standard_class_names("Cars", tmp_path) == task.class_names


def test_standard_class_names():
    assert standard_class_names("MNIST") == DIGITS
    assert standard_class_names("RESISC45")[:2] == ["airplane", "airport"]
    assert standard_class_names("RESISC45")[2] == "baseball diamond"
    assert standard_class_names("EuroSAT")[-1] == "lake or sea"
    with pytest.raises(ValueError, match="DTD's class names come from its data"):
        standard_class_names("DTD")
    with pytest.raises(KeyError, match="'ImageNet'"):
        standard_class_names("ImageNet")
