"""The task-arithmetic papers' pickled zero-shot heads (``head_<Dataset>.pt``) converted into ours."""

import pickle
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from vtvc_pyro.checkpoints import LegacyPickleError, convert_checkpoint
from vtvc_pyro.cli import main
from vtvc_pyro.heads import ClassificationHead
from vtvc_pyro.standard_tasks import DIGITS, EUROSAT_CLASSES


def _save_papers_head(path, weight, bias=None, normalize=True, fmt="zip"):
    """Pickle a head as mlfoundations/task_vectors does: ``src.modeling.ClassificationHead``, an
    ``nn.Linear`` subclass with a ``normalize`` flag, saved whole with ``torch.save`` (``fmt="zip"``), the
    pre-1.6 torch format (``"legacy"``) or, as their oldest heads, ``pickle.dump`` (``"pickle"``)."""
    src, modeling = types.ModuleType("src"), types.ModuleType("src.modeling")

    class ClassificationHead(torch.nn.Linear):
        def __init__(self, normalize, weights, biases=None):
            out_features, in_features = weights.shape
            super().__init__(in_features, out_features)
            self.normalize = normalize
            self.weight = torch.nn.Parameter(weights.clone())
            self.bias = torch.nn.Parameter(torch.zeros_like(self.bias) if biases is None else biases.clone())

    ClassificationHead.__module__, ClassificationHead.__qualname__ = "src.modeling", "ClassificationHead"
    modeling.ClassificationHead, src.modeling = ClassificationHead, modeling
    sys.modules.update({"src": src, "src.modeling": modeling})
    try:
        head = ClassificationHead(normalize, weight, bias)
        if fmt == "pickle":
            with open(path, "wb") as handle:
                pickle.dump(head, handle)
        else:
            torch.save(head, path, _use_new_zipfile_serialization=fmt == "zip")
    finally:
        del sys.modules["src"], sys.modules["src.modeling"]
    return path


def _zero_shot_weight(classes: int, dim: int = 8, scale: float = 100.0, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return scale * F.normalize(torch.randn(classes, dim), dim=-1)  # text embeddings × exp(logit_scale)


@pytest.mark.filterwarnings("ignore:Couldn't retrieve source code")  # torch.save in the pre-1.6 format
@pytest.mark.parametrize("fmt", ["zip", "legacy", "pickle"])
def test_papers_head_converts_to_the_same_logits(tmp_path, fmt):
    weight = _zero_shot_weight(10)
    path = _save_papers_head(tmp_path / "head_MNIST.pt", weight, fmt=fmt)
    out = tmp_path / "heads" / "MNIST.safetensors"
    with pytest.raises(LegacyPickleError, match="--trust-pickle"):
        convert_checkpoint(path, out)
    summary = convert_checkpoint(path, out, trust_pickle=True)
    assert summary.startswith(f"wrote {out}: zero-shot head with 10 classes, logit scale 100")
    head = ClassificationHead.load(out)
    assert head.class_names == DIGITS
    assert head.logit_scale == pytest.approx(100.0, rel=1e-6)
    features = torch.randn(5, 8)
    papers_logits = F.normalize(features, dim=-1) @ weight.T  # their forward: normalise, then nn.Linear
    torch.testing.assert_close(head(features), papers_logits, rtol=1e-5, atol=1e-4)


def test_class_names_from_the_file_name_a_list_or_a_file(tmp_path):
    val_head = _save_papers_head(tmp_path / "head_EuroSATVal.pt", _zero_shot_weight(10))
    convert_checkpoint(val_head, tmp_path / "eurosat.safetensors", trust_pickle=True)
    assert ClassificationHead.load(tmp_path / "eurosat.safetensors").class_names == [
        EUROSAT_CLASSES[c] for c in sorted(EUROSAT_CLASSES)]
    cars = _save_papers_head(tmp_path / "head_Cars.pt", _zero_shot_weight(3))
    with pytest.raises(ValueError, match=r"Cars's class names come from its data: give the data root"):
        convert_checkpoint(cars, tmp_path / "cars.safetensors", trust_pickle=True)
    (tmp_path / "cars.txt").write_text("audi a4\nbmw m3\n\nvolvo xc90\n")
    out = tmp_path / "cars.safetensors"
    convert_checkpoint(cars, out, trust_pickle=True, class_names=tmp_path / "cars.txt")
    assert ClassificationHead.load(out).class_names == ["audi a4", "bmw m3", "volvo xc90"]
    odd = _save_papers_head(tmp_path / "classifier.pt", _zero_shot_weight(2))
    with pytest.raises(ValueError, match=r"classifier.pt': cannot tell the dataset from the file name"):
        convert_checkpoint(odd, tmp_path / "odd.safetensors", trust_pickle=True)
    convert_checkpoint(odd, tmp_path / "odd.safetensors", trust_pickle=True, class_names=["a", "b"])
    with pytest.raises(ValueError, match="head has 2 rows but 3 class names"):
        convert_checkpoint(odd, tmp_path / "odd.safetensors", trust_pickle=True, overwrite=True,
                           class_names=["a", "b", "c"])


def test_heads_ours_cannot_hold_are_refused(tmp_path):
    weight = _zero_shot_weight(10)
    cases = {
        "bias": (dict(bias=torch.full((10,), 0.5)), "has a non-zero bias"),
        "raw": (dict(normalize=False), "has normalize=False"),
        "uneven": (dict(weight=weight * torch.linspace(1, 2, 10)[:, None]), "'s rows have different norms"),
    }
    for name, (kwargs, message) in cases.items():
        path = _save_papers_head(tmp_path / f"head_MNIST_{name}.pt", kwargs.pop("weight", weight), **kwargs)
        with pytest.raises(ValueError, match=f"head_MNIST_{name}.pt: the head ?{message}"):
            convert_checkpoint(path, tmp_path / f"{name}.safetensors", trust_pickle=True, class_names=DIGITS)
        assert not (tmp_path / f"{name}.safetensors").exists()


def test_cli_converts_a_head(tmp_path, capsys):
    path = _save_papers_head(tmp_path / "head_SVHN.pt", _zero_shot_weight(10, seed=3))
    main(["convert", "--trust-pickle", str(path), str(tmp_path / "heads" / "SVHN.safetensors")])
    assert "zero-shot head with 10 classes" in capsys.readouterr().out
    assert ClassificationHead.load(tmp_path / "heads" / "SVHN.safetensors").class_names == DIGITS
