"""Checkpoint I/O: formats, prefixes, clear errors, opt-in legacy pickles, offline model creation."""

import json
import logging
import sys
import types

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU, VisionTransformer
from safetensors.torch import save_file

from vtvc_pyro import TaskVectorBank
from vtvc_pyro.checkpoints import (
    LegacyPickleError,
    convert_legacy_checkpoint,
    create_model,
    load_state_dict,
    read_metadata,
    register_model_config,
    save_state_dict,
)

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 16, "patch_size": 4,
                   "mlp_ratio": 2},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_name(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("configs") / "vtvc-test-tinyclip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return register_model_config(path)


@pytest.fixture(scope="module")
def clip(tiny_name):
    torch.manual_seed(0)
    return open_clip.create_model(tiny_name, pretrained=None)


def assert_same_tensors(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def test_safetensors_and_torch_files_load_as_visual_state_dicts(clip, tmp_path):
    visual = clip.visual.state_dict()
    save_state_dict(visual, tmp_path / "enc.safetensors")
    torch.save(visual, tmp_path / "enc.pt")
    for name in ("enc.safetensors", "enc.pt"):
        assert_same_tensors(load_state_dict(tmp_path / name), visual)  # order kept, too


def test_prefixes_are_stripped(clip, tmp_path):
    visual = clip.visual.state_dict()
    full = clip.state_dict()  # visual.* plus the text tower
    assert any(not k.startswith("visual.") for k in full)
    image_encoder = {f"model.{k}": v for k, v in full.items()}  # a legacy ImageEncoder's state dict
    ddp = {"state_dict": {f"module.{k}": v for k, v in full.items()}, "epoch": 3}
    torch.save(full, tmp_path / "full.pt")
    torch.save(image_encoder, tmp_path / "image_encoder.pt")
    torch.save(ddp, tmp_path / "ddp.pt")
    save_file({k: v.contiguous() for k, v in image_encoder.items()}, str(tmp_path / "ie.safetensors"))
    for name in ("full.pt", "image_encoder.pt", "ddp.pt", "ie.safetensors"):
        got = load_state_dict(tmp_path / name)
        assert sorted(got) == sorted(visual), name
        assert all(torch.equal(got[k], visual[k]) for k in visual), name


def test_bad_files_raise_naming_the_file(clip, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_state_dict(tmp_path / "missing.pt")
    torch.save(clip.visual.state_dict(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.pt' is not a readable torch checkpoint \(truncated or"):
        load_state_dict(tmp_path / "cut.pt")
    save_state_dict(clip.visual.state_dict(), tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="cut.safetensors' is not a readable safetensors file"):
        load_state_dict(tmp_path / "cut.safetensors")
    (tmp_path / "notes.pt").write_text("these are not weights\n")
    with pytest.raises(ValueError, match="notes.pt' is not a readable torch checkpoint"):
        load_state_dict(tmp_path / "notes.pt")
    torch.save({"lr": 0.1, "steps": 3}, tmp_path / "config.pt")
    with pytest.raises(ValueError, match="config.pt' is not a state dict of tensors: entry 'lr' is a float"):
        load_state_dict(tmp_path / "config.pt")
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list.pt' holds a list, not a state dict"):
        load_state_dict(tmp_path / "list.pt")


def _save_legacy(tmp_path, clip, name="legacy.pt", old_names=False):
    """Pickle a whole ImageEncoder as mlfoundations/task_vectors did: a module ``src.modeling`` and a
    preprocessing helper module that exist only while saving, optionally with the old open_clip class
    name ``VisualTransformer``."""
    src, modeling = types.ModuleType("src"), types.ModuleType("src.modeling")
    helpers = types.ModuleType("vtvc_gone_transforms")

    class ToRGB:
        def __init__(self, mode):
            self.mode = mode

    class ImageEncoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.train_preprocess = ToRGB("RGB")

    ToRGB.__module__, ToRGB.__qualname__ = "vtvc_gone_transforms", "ToRGB"
    ImageEncoder.__module__, ImageEncoder.__qualname__ = "src.modeling", "ImageEncoder"
    modeling.ImageEncoder, src.modeling, helpers.ToRGB = ImageEncoder, modeling, ToRGB
    visual_class = type(clip.visual)
    if old_names:
        old = type("VisualTransformer", (VisionTransformer,), {"__module__": "open_clip.model"})
        open_clip.model.VisualTransformer = old
        clip.visual.__class__ = old
    sys.modules.update({"src": src, "src.modeling": modeling, "vtvc_gone_transforms": helpers})
    try:
        torch.save(ImageEncoder(clip), tmp_path / name)
    finally:
        del sys.modules["src"], sys.modules["src.modeling"], sys.modules["vtvc_gone_transforms"]
        clip.visual.__class__ = visual_class
        if old_names:
            del open_clip.model.VisualTransformer
    return tmp_path / name


def test_legacy_pickle_needs_opt_in(clip, tmp_path):
    path = _save_legacy(tmp_path, clip, old_names=True)
    refusal = r"legacy.pt' is a legacy pickle.*src\.modeling\.ImageEncoder.*trust_pickle=True.*--trust-pickle"
    with pytest.raises(LegacyPickleError, match=refusal):
        load_state_dict(path)
    with pytest.raises(LegacyPickleError):
        TaskVectorBank.from_checkpoints(path, {"a": path})
    got = load_state_dict(path, trust_pickle=True)
    assert_same_tensors(got, clip.visual.state_dict())
    assert "src" not in sys.modules and "src.modeling" not in sys.modules  # the shim left no aliases
    assert not hasattr(open_clip.model, "VisualTransformer")


def test_convert_legacy_checkpoint(clip, tmp_path):
    path = _save_legacy(tmp_path, clip)
    out = tmp_path / "converted.safetensors"
    with pytest.raises(LegacyPickleError, match="--trust-pickle"):
        convert_legacy_checkpoint(path, out, trust_pickle=False)
    assert not out.exists()
    convert_legacy_checkpoint(path, out, trust_pickle=True)
    assert_same_tensors(load_state_dict(out), clip.visual.state_dict())
    meta = read_metadata(out)
    assert meta["quick_gelu"] == "false" and meta["source"] == "legacy.pt"
    with pytest.raises(ValueError, match="converted.safetensors' exists; pass overwrite=True"):
        convert_legacy_checkpoint(path, out, trust_pickle=True)
    convert_legacy_checkpoint(path, out, trust_pickle=True, overwrite=True)


def test_create_model_offline_and_quick_gelu(tiny_name, tmp_path):
    default = create_model(tiny_name)
    assert isinstance(default.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    quick = create_model(tiny_name, quick_gelu=True)
    assert isinstance(quick.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    # a legacy QuickGELU encoder (like OpenAI's ViT-B/32): the converted file records the activation ...
    torch.manual_seed(1)
    legacy = _save_legacy(tmp_path, quick, name="quick.pt")
    converted = tmp_path / "quick.safetensors"
    convert_legacy_checkpoint(legacy, converted, trust_pickle=True)
    assert read_metadata(converted)["quick_gelu"] == "true"
    # ... so create_model picks it up and reproduces the original encoder's features exactly
    restored = create_model(tiny_name, pretrained=converted)
    assert isinstance(restored.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(restored.visual(images), quick.visual(images), rtol=0, atol=0)
    with pytest.warns(UserWarning, match="quick_gelu=False contradicts"):
        create_model(tiny_name, pretrained=converted, quick_gelu=False)


def test_random_init_is_logged_only_when_no_weights_are_loaded(tiny_name, clip, tmp_path, caplog):
    save_state_dict(clip.visual.state_dict(), tmp_path / "enc.safetensors")
    with caplog.at_level(logging.WARNING):
        create_model(tiny_name, pretrained=tmp_path / "enc.safetensors")
    assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]
    with caplog.at_level(logging.WARNING):
        create_model(tiny_name)
    assert [r for r in caplog.records if "No pretrained weights" in r.getMessage()]


def test_create_model_loads_full_and_encoder_files(tiny_name, clip, tmp_path):
    torch.save(clip.state_dict(), tmp_path / "full.pt")
    full = create_model(tiny_name, pretrained=tmp_path / "full.pt")
    assert_same_tensors(full.state_dict(), clip.state_dict())
    save_state_dict(clip.visual.state_dict(), tmp_path / "enc.safetensors")
    enc = create_model(tiny_name, pretrained=tmp_path / "enc.safetensors")
    assert_same_tensors(enc.visual.state_dict(), clip.visual.state_dict())
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        create_model(tiny_name, pretrained=tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="unknown open_clip architecture 'vtvc-no-such-model'"):
        create_model("vtvc-no-such-model")
    wrong = {k: v for k, v in clip.visual.state_dict().items() if k != "proj"}
    save_state_dict(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match="(?s)wrong.safetensors' does not fit architecture .*proj"):
        create_model(tiny_name, pretrained=tmp_path / "wrong.safetensors")


def test_register_model_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.json"):
        register_model_config(tmp_path / "absent.json")
    (tmp_path / "partial.json").write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(ValueError, match=r"partial.json' lacks \['vision_cfg', 'text_cfg'\]"):
        register_model_config(tmp_path / "partial.json")


def test_cli_convert_and_bank_build(clip, tmp_path, capsys):
    from vtvc_pyro.cli import main

    legacy = _save_legacy(tmp_path, clip)
    out = tmp_path / "zeroshot.safetensors"
    with pytest.raises(SystemExit) as refused:
        main(["convert", str(legacy), str(out)])
    assert refused.value.code == 2 and "--trust-pickle" in capsys.readouterr().err and not out.exists()
    main(["convert", str(legacy), str(out), "--trust-pickle"])
    assert_same_tensors(load_state_dict(out), clip.visual.state_dict())
    bank_path = tmp_path / "bank.safetensors"
    main(["bank", "build", "--pretrained", str(out), "--finetuned", f"a={legacy}", f"b={out}",
          "--out", str(bank_path), "--blocks", "layer", "--dtype", "bfloat16", "--trust-pickle"])
    bank = TaskVectorBank.load(bank_path)
    assert bank.task_names == ["a", "b"] and bank.num_blocks == 4 and bank.vectors.dtype == torch.bfloat16
    assert not bank.vectors.any()  # both "fine-tuned" files hold θ0 itself
