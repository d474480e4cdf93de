"""Checkpoint I/O: formats, prefixes, clear errors, opt-in legacy pickles (allowlisted), TorchScript archives,
the activation every source states, offline model creation."""

import io
import json
import logging
import os
import sys
import types
import warnings
import zipfile

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU, VisionTransformer
from safetensors.torch import save_file

from vtvc_pyro import TaskVectorBank
from vtvc_pyro.checkpoints import (
    LegacyPickleError,
    convert_checkpoint,
    create_model,
    load_state_dict,
    read_checkpoint,
    read_metadata,
    register_model_config,
    save_state_dict,
)
from vtvc_pyro.pickles import AllowlistUnpickler, RefusedGlobalError

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
    """Pickle a whole ImageEncoder as mlfoundations/task_vectors did: a module ``src.modeling`` that exists
    only while saving, open_clip's train / val preprocessing, and an open_clip helper class that no longer
    exists; optionally with the old open_clip class name ``VisualTransformer``."""
    from open_clip.transform import image_transform

    src, modeling = types.ModuleType("src"), types.ModuleType("src.modeling")

    class GoneHelper(torch.nn.Module):
        pass

    class ImageEncoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.train_preprocess = image_transform(16, is_train=True)
            self.val_preprocess = image_transform(16, is_train=False)
            self.helper = GoneHelper()

    GoneHelper.__module__, GoneHelper.__qualname__ = "open_clip.transform", "VtvcGoneHelper"
    ImageEncoder.__module__, ImageEncoder.__qualname__ = "src.modeling", "ImageEncoder"
    modeling.ImageEncoder, src.modeling = ImageEncoder, modeling
    open_clip.transform.VtvcGoneHelper = GoneHelper
    visual_class = type(clip.visual)
    if old_names:
        old = type("VisualTransformer", (VisionTransformer,), {"__module__": "open_clip.model"})
        open_clip.model.VisualTransformer = old
        clip.visual.__class__ = old
    sys.modules.update({"src": src, "src.modeling": modeling})
    try:
        torch.save(ImageEncoder(clip), tmp_path / name)
    finally:
        del sys.modules["src"], sys.modules["src.modeling"], open_clip.transform.VtvcGoneHelper
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
        convert_checkpoint(path, out, trust_pickle=False)
    assert not out.exists()
    summary = convert_checkpoint(path, out, trust_pickle=True)
    assert "image encoder state dict" in summary and "GELU" in summary
    assert_same_tensors(load_state_dict(out), clip.visual.state_dict())
    meta = read_metadata(out)
    assert (meta["quick_gelu"], meta["source"], meta["source_format"]) == ("false", "legacy.pt", "pickle")
    with pytest.raises(ValueError, match="converted.safetensors' exists; pass overwrite=True"):
        convert_checkpoint(path, out, trust_pickle=True)
    convert_checkpoint(path, out, trust_pickle=True, overwrite=True)


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


# ---------------------------------------------------------------------------- the activation of every source


def _gelu_kind(model) -> type:
    return type(model.visual.transformer.resblocks[0].mlp.gelu)


@pytest.fixture(scope="module")
def quick_name(tmp_path_factory) -> str:
    """The tiny architecture under a name that states QuickGELU (like ``ViT-B-32-quickgelu``)."""
    path = tmp_path_factory.mktemp("configs") / "vtvc-test-tinyclip-quickgelu.json"
    path.write_text(json.dumps({**TINY_CLIP, "quick_gelu": True}))
    return register_model_config(path)


def test_create_model_takes_the_activation_from_every_source(tiny_name, tmp_path):
    default = create_model(tiny_name)
    assert _gelu_kind(default) is torch.nn.GELU
    torch.manual_seed(1)
    quick = create_model(tiny_name, quick_gelu=True)
    assert _gelu_kind(quick) is QuickGELU
    visual = quick.visual.state_dict()
    # a papers-style pickle of a QuickGELU encoder, loaded directly (the zoo.trust_pickle route) ...
    pickled = _save_legacy(tmp_path, quick, name="quick.pt")
    # ... converted (metadata), a torch file with an explicit flag, and a safetensors file without any
    converted = tmp_path / "quick.safetensors"
    convert_checkpoint(pickled, converted, trust_pickle=True)
    assert read_metadata(converted)["quick_gelu"] == "true"
    torch.save({"state_dict": visual, "quick_gelu": True}, tmp_path / "flagged.pt")
    save_state_dict(visual, tmp_path / "silent.safetensors")
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = quick.visual(images)
    for name in ("quick.pt", "quick.safetensors", "flagged.pt"):
        restored = create_model(tiny_name, pretrained=tmp_path / name, trust_pickle=True)
        assert _gelu_kind(restored) is QuickGELU, name
        with torch.no_grad():
            torch.testing.assert_close(restored.visual(images), expected, rtol=0, atol=0)
    assert read_checkpoint(tmp_path / "silent.safetensors").quick_gelu is None
    assert _gelu_kind(create_model(tiny_name, pretrained=tmp_path / "silent.safetensors")) is torch.nn.GELU
    torch.save({"state_dict": visual, "quick_gelu": "yes"}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="odd.pt' entry 'quick_gelu': quick_gelu must be true or false"):
        read_checkpoint(tmp_path / "odd.pt")


def test_a_name_or_argument_contradicting_the_checkpoint_is_refused(tiny_name, quick_name, clip, tmp_path):
    gelu_pickle = _save_legacy(tmp_path, clip, name="gelu.pt")
    refusal = (r"model 'vtvc-test-tinyclip-quickgelu' uses QuickGELU but .*gelu.pt' was saved from a model "
               r"with GELU; use model 'vtvc-test-tinyclip'")
    with pytest.raises(ValueError, match=refusal):
        create_model(quick_name, pretrained=gelu_pickle, trust_pickle=True)
    torch.save({"state_dict": clip.visual.state_dict(), "quick_gelu": True}, tmp_path / "quick.pt")
    assert _gelu_kind(create_model(quick_name, pretrained=tmp_path / "quick.pt")) is QuickGELU
    with pytest.raises(ValueError, match=r"quick_gelu=False contradicts .*quick.pt', which was saved from a "
                                         r"model with QuickGELU"):
        create_model(tiny_name, pretrained=tmp_path / "quick.pt", quick_gelu=False)


@pytest.mark.slow
def test_papers_pickle_with_quick_gelu_under_vit_b_32(tmp_path):
    """The issue's case at full size: the papers' name ``ViT-B-32`` and a pickled QuickGELU ImageEncoder."""
    torch.manual_seed(0)
    quick = open_clip.create_model("ViT-B-32", pretrained=None, quick_gelu=True).eval()
    pickled = _save_legacy(tmp_path, quick, name="zeroshot.pt")
    model = create_model("ViT-B-32", pretrained=pickled, trust_pickle=True).eval()
    assert _gelu_kind(model) is QuickGELU
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.visual(images), quick.visual(images), rtol=0, atol=0)


# ---------------------------------------------------------------------------- --trust-pickle allowlist


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_trust_pickle_refuses_globals_outside_the_allowlist(clip, tmp_path):
    marker = tmp_path / "payload-ran"
    torch.save({"visual": clip.visual, "payload": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil.pt': cannot unpickle .*refused global '(posix|nt)\.system'"):
        load_state_dict(tmp_path / "evil.pt", trust_pickle=True)
    assert not marker.exists()
    unpickler = AllowlistUnpickler(io.BytesIO())
    refused = [("torch", "os.system"), ("torch", "load"), ("torch.utils.cpp_extension", "load_inline"),
               ("builtins", "eval"), ("builtins", "getattr"), ("open_clip.factory", "create_model"),
               ("open_clip.hf_model", "HFTextEncoder"), ("torchvision.datasets", "ImageFolder"),
               ("subprocess", "Popen")]
    for module, name in refused:
        with pytest.raises(RefusedGlobalError, match=f"refused global '{module}.{name}'"):
            unpickler.find_class(module, name)
    # a hand-made protocol-4 stream reaching os.system through torch's namespace is refused, not run
    command = f"touch {marker}".encode()
    stream = (b"\x80\x04\x8c\x05torch\x8c\x09os.system\x93\x8c" + bytes([len(command)]) + command
              + b"\x85R.")
    with pytest.raises(RefusedGlobalError, match="'torch.os.system'"):
        AllowlistUnpickler(io.BytesIO(stream)).load()
    assert not marker.exists()


def test_directories_are_refused_with_one_line(clip, tmp_path):
    (tmp_path / "ckpt_dir").mkdir()
    refusal = r"checkpoint '.*ckpt_dir' is a directory: give a checkpoint file, or a Hugging Face CLIP dir"
    with pytest.raises(ValueError, match=refusal):
        load_state_dict(tmp_path / "ckpt_dir")
    save_state_dict(clip.visual.state_dict(), tmp_path / "enc.safetensors")
    with pytest.raises(ValueError, match=r"output '.*ckpt_dir' is a directory: give a file path, e.g. "
                                         r".*ckpt_dir/enc.safetensors"):
        convert_checkpoint(tmp_path / "enc.safetensors", tmp_path / "ckpt_dir")


# ---------------------------------------------------------------------------- TorchScript archives


def _torchscript(model, path, half=False):
    """A TorchScript archive of a CLIP, as OpenAI distributes ``ViT-B-32.pt`` (traced, fp16 weights)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(model.eval(), {"encode_image": torch.randn(1, 3, 16, 16)},
                                        check_trace=False)
        if half:
            traced = traced.half()
        traced.save(str(path))
    return path


def _with_code_line(archive, out, line):
    """Copy a zip archive, appending a line to every TorchScript code file."""
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if "/code/" in item.filename and item.filename.endswith(".py"):
                data += f"\n{line}\n".encode()
            dst.writestr(item, data)
    return out


def test_torchscript_archive_is_read_without_running_its_code(tiny_name, tmp_path, monkeypatch):
    torch.manual_seed(2)
    clip = open_clip.create_model(tiny_name, pretrained=None, quick_gelu=True)
    marker = tmp_path / "code-ran"
    archive = _with_code_line(_torchscript(clip, tmp_path / "plain.pt"), tmp_path / "ViT-tiny.pt",
                              f"__import__('os').system('touch {marker}')")

    def no_jit(*args, **kwargs):
        raise AssertionError("torch.jit.load must not be called")

    monkeypatch.setattr(torch.jit, "load", no_jit)
    ckpt = read_checkpoint(archive)
    assert ckpt.kind == "torchscript" and ckpt.quick_gelu is True and ckpt.is_full_clip
    assert sorted(ckpt.state_dict) == sorted(clip.state_dict())  # attn_mask (not a weight) dropped
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in clip.state_dict().items())
    assert not marker.exists()
    model = create_model(tiny_name, pretrained=archive)
    assert _gelu_kind(model) is QuickGELU
    assert_same_tensors(model.state_dict(), clip.state_dict())
    out = tmp_path / "openai_clip.safetensors"
    assert "full CLIP state dict" in convert_checkpoint(archive, out)
    assert read_metadata(out)["quick_gelu"] == "true" and read_metadata(out)["source_format"] == "torchscript"
    assert_same_tensors(create_model(tiny_name, pretrained=out).state_dict(), clip.state_dict())
    assert not marker.exists()


def test_torchscript_archive_without_class_code_is_refused(tiny_name, tmp_path):
    torch.manual_seed(2)
    archive = _torchscript(open_clip.create_model(tiny_name, pretrained=None), tmp_path / "full.pt")
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(tmp_path / "cut.pt", "w") as dst:
        for item in src.infolist():
            if "/code/" not in item.filename or "/open_clip/model" not in item.filename:
                dst.writestr(item, src.read(item))  # drop the code of CLIP (mangled if traced before)
    refusal = (r"cut.pt' is a TorchScript archive this reader cannot parse .*class "
               r"__torch__.open_clip.model.(___torch_mangle_\d+.)?CLIP \(at the root\) is not defined")
    with pytest.raises(ValueError, match=refusal):
        load_state_dict(tmp_path / "cut.pt")


def test_fp16_torchscript_weights_become_float32(tiny_name, tmp_path):
    torch.manual_seed(3)
    clip = open_clip.create_model(tiny_name, pretrained=None, quick_gelu=True)
    state = read_checkpoint(_torchscript(clip, tmp_path / "half.pt", half=True)).state_dict
    for k, v in clip.state_dict().items():
        assert state[k].dtype == torch.float32 and torch.equal(state[k], v.half().float()), k
