"""Loaders of the 8 standard datasets: missing-data errors, fake local layouts, the val protocol."""

import pytest
import torch
from PIL import Image

from vtvc_pyro.data import train_val_split
from vtvc_pyro.standard_tasks import (
    LAYOUTS,
    STANDARD_TASKS,
    TEMPLATES,
    MissingDatasetError,
    load_standard_task,
    load_standard_tasks,
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
