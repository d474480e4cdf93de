"""Hugging Face CLIP checkpoints: key mapping both ways, same image features as transformers, directories
accepted wherever a checkpoint path is (bank, convert, create_model)."""

import json
import time

import open_clip
import pytest
import torch

from vtvc_pyro import TaskVectorBank
from vtvc_pyro.checkpoints import (
    convert_checkpoint,
    create_model,
    load_state_dict,
    read_checkpoint,
    read_metadata,
    register_model_config,
    save_state_dict,
)
from vtvc_pyro.hf_clip import hf_to_open_clip, open_clip_to_hf

transformers = pytest.importorskip("transformers")

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "image_size": 16, "patch_size": 4, "projection_dim": 16}
TINY_TEXT = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "max_position_embeddings": 8, "vocab_size": 100, "projection_dim": 16,
             "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # eos 2: pool at the argmax token


def _open_clip_config(vision: dict, quick_gelu: bool, text: dict | None = None) -> dict:
    """The open_clip architecture of a transformers CLIP config, written out by hand."""
    text = text or {"hidden_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1,
                    "max_position_embeddings": 8, "vocab_size": 100}
    return {"embed_dim": vision["projection_dim"], "quick_gelu": quick_gelu,
            "vision_cfg": {"image_size": vision["image_size"], "layers": vision["num_hidden_layers"],
                           "width": vision["hidden_size"],
                           "head_width": vision["hidden_size"] // vision["num_attention_heads"],
                           "patch_size": vision["patch_size"],
                           "mlp_ratio": vision["intermediate_size"] / vision["hidden_size"]},
            "text_cfg": {"context_length": text["max_position_embeddings"], "vocab_size": text["vocab_size"],
                         "width": text["hidden_size"], "heads": text["num_attention_heads"],
                         "layers": text["num_hidden_layers"],
                         "mlp_ratio": text.get("intermediate_size", 64) / text["hidden_size"]}}


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("configs") / "vtvc-test-hf-tiny.json"
    path.write_text(json.dumps(_open_clip_config(TINY, True, TINY_TEXT)))
    return register_model_config(path)


def _hf_vision(seed: int, **overrides):
    torch.manual_seed(seed)
    config = transformers.CLIPVisionConfig(**{**TINY, **overrides})
    return transformers.CLIPVisionModelWithProjection(config).eval()


def _reference_to_open_clip(hf_state: dict, layers: int) -> dict:
    """The mapping written out tensor by tensor (the test's own oracle, independent of hf_clip's tables)."""
    v = "vision_model."
    out = {"class_embedding": hf_state[f"{v}embeddings.class_embedding"],
           "positional_embedding": hf_state[f"{v}embeddings.position_embedding.weight"],
           "proj": hf_state["visual_projection.weight"].T,
           "conv1.weight": hf_state[f"{v}embeddings.patch_embedding.weight"],
           "ln_pre.weight": hf_state[f"{v}pre_layrnorm.weight"],
           "ln_pre.bias": hf_state[f"{v}pre_layrnorm.bias"]}
    for i in range(layers):
        hf, oc = f"{v}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{oc}ln_1.{kind}"] = hf_state[f"{hf}layer_norm1.{kind}"]
            out[f"{oc}attn.in_proj_{kind}"] = torch.cat([hf_state[f"{hf}self_attn.{x}_proj.{kind}"]
                                                         for x in "qkv"])
            out[f"{oc}attn.out_proj.{kind}"] = hf_state[f"{hf}self_attn.out_proj.{kind}"]
            out[f"{oc}ln_2.{kind}"] = hf_state[f"{hf}layer_norm2.{kind}"]
            out[f"{oc}mlp.c_fc.{kind}"] = hf_state[f"{hf}mlp.fc1.{kind}"]
            out[f"{oc}mlp.c_proj.{kind}"] = hf_state[f"{hf}mlp.fc2.{kind}"]
    out["ln_post.weight"] = hf_state[f"{v}post_layernorm.weight"]
    out["ln_post.bias"] = hf_state[f"{v}post_layernorm.bias"]
    return out


def test_every_tensor_is_mapped_and_back(tmp_path):
    hf = _hf_vision(0)
    state = {k: v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    mapped = hf_to_open_clip(state)
    expected = _reference_to_open_clip(state, TINY["num_hidden_layers"])
    assert sorted(mapped) == sorted(expected)
    assert all(torch.equal(mapped[k], expected[k]) for k in expected)
    back = open_clip_to_hf(mapped)
    assert sorted(back) == sorted(state) and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="key 'vision_model.extra.weight' has no open_clip counterpart"):
        hf_to_open_clip({**state, "vision_model.extra.weight": torch.ones(1)})
    with pytest.raises(ValueError, match="unexpected key 'logit_bias'"):
        hf_to_open_clip({**state, "logit_bias": torch.ones(1)})
    partial = {k: v for k, v in state.items() if "layers.1.self_attn.k_proj.weight" not in k}
    with pytest.raises(ValueError, match=r"resblocks.1.attn.in_proj_weight: .* lacks the \['k'\] projection"):
        hf_to_open_clip(partial)


def _same_features(hf, arch: str, directory, size: int, atol: float = 1e-5):
    model = create_model(arch, pretrained=directory).eval()
    assert type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    torch.manual_seed(5)
    images = torch.randn(3, 3, size, size)
    with torch.no_grad():
        expected = hf(pixel_values=images).image_embeds
        got = model.visual(images)
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)


def test_tiny_hf_directory_gives_the_same_image_features(tiny_arch, tmp_path):
    hf = _hf_vision(1)
    hf.save_pretrained(tmp_path / "hf")
    ckpt = read_checkpoint(tmp_path / "hf")
    assert ckpt.kind == "hf" and ckpt.quick_gelu is True and not ckpt.is_full_clip
    _same_features(hf, tiny_arch, tmp_path / "hf", 16)
    out = tmp_path / "converted.safetensors"
    assert "image encoder state dict" in convert_checkpoint(tmp_path / "hf", out)
    meta = read_metadata(out)
    assert meta["quick_gelu"] == "true" and meta["source_format"] == "hf" and meta["source"] == "hf"
    _same_features(hf, tiny_arch, out, 16)


def test_pytorch_model_bin_and_gelu_config(tmp_path):
    hf = _hf_vision(2, hidden_act="gelu")
    hf.save_pretrained(tmp_path / "hf")
    # what older transformers versions (and FusionBench's pool) write: torch.save of the state dict
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    ckpt = read_checkpoint(tmp_path / "hf")
    assert ckpt.quick_gelu is False
    expected = _reference_to_open_clip(hf.state_dict(), TINY["num_hidden_layers"])
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in expected.items())


def test_full_clip_model_directory_maps_both_towers(tiny_arch, tmp_path):
    torch.manual_seed(3)
    config = transformers.CLIPConfig(text_config=TINY_TEXT, vision_config=TINY, projection_dim=16)
    hf = transformers.CLIPModel(config).eval()
    hf.save_pretrained(tmp_path / "clip")
    ckpt = read_checkpoint(tmp_path / "clip")
    assert ckpt.is_full_clip and ckpt.quick_gelu is True
    model = create_model(tiny_arch, pretrained=tmp_path / "clip").eval()  # strict: every tensor placed
    tokens = torch.randint(1, 99, (2, 8))
    tokens[:, -1] = 99  # the end-of-text token (highest id), where both towers pool
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = hf(input_ids=tokens, pixel_values=images)
        image, text = model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
    # CLIPModel returns L2-normalised embeddings
    torch.testing.assert_close(image, out.image_embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(text, out.text_embeds, rtol=0, atol=1e-5)
    back = open_clip_to_hf(model.state_dict())
    reference = {k: v for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    assert sorted(back) == sorted(reference)
    assert all(torch.equal(back[k], reference[k]) for k in reference)


def test_bank_from_hf_directories_equals_bank_from_safetensors(tmp_path):
    models = {"base": _hf_vision(10), "a": _hf_vision(11), "b": _hf_vision(12)}
    paths = {}
    for name, hf in models.items():
        hf.save_pretrained(tmp_path / name)
        state = _reference_to_open_clip(hf.state_dict(), TINY["num_hidden_layers"])
        save_state_dict(state, tmp_path / f"{name}.safetensors")
        paths[name] = tmp_path / f"{name}.safetensors"
    from_hf = TaskVectorBank.from_checkpoints(tmp_path / "base", {"a": tmp_path / "a", "b": tmp_path / "b"},
                                              blocks="layer")
    from_st = TaskVectorBank.from_checkpoints(paths["base"], {"a": paths["a"], "b": paths["b"]},
                                              blocks="layer")
    assert sorted(from_hf.param_names) == sorted(from_st.param_names)
    for name in from_st.param_names:
        assert torch.equal(from_hf.task_vector(name), from_st.task_vector(name)), name
        assert torch.equal(from_hf.pretrained_tensor(name), from_st.pretrained_tensor(name)), name
    assert from_hf.sources["a"]["sha256"] != from_hf.sources["b"]["sha256"]
    assert sorted(load_state_dict(tmp_path / "a")) == sorted(load_state_dict(paths["a"]))


@pytest.mark.slow
def test_vit_b32_shape_gives_the_same_image_features(tmp_path):
    """The round trip at OpenAI ViT-B/32's shape (transformers' CLIPVisionConfig defaults)."""
    start = time.perf_counter()
    torch.manual_seed(0)
    hf = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig()).eval()
    hf.save_pretrained(tmp_path / "hf")
    _same_features(hf, "ViT-B-32-quickgelu", tmp_path / "hf", 224)
    assert open_clip.get_model_config("ViT-B-32-quickgelu")["vision_cfg"]["width"] == 768
    print(f"ViT-B/32 HF round trip: {time.perf_counter() - start:.1f} s")


def test_vision_model_without_projection_takes_proj_from_its_base(tmp_path):
    """FusionBench's fine-tuned models are CLIPVisionModel directories (no visual_projection); the pre-trained
    CLIPModel they start from supplies ``proj``, so the converted files make a bank with a zero τ for it."""
    torch.manual_seed(4)
    config = transformers.CLIPConfig(text_config=TINY_TEXT, vision_config=TINY, projection_dim=16)
    clip = transformers.CLIPModel(config).eval()
    clip.save_pretrained(tmp_path / "pretrained")
    torch.manual_seed(5)
    tuned = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY)).eval()
    tuned.save_pretrained(tmp_path / "tuned")
    assert "proj" not in load_state_dict(tmp_path / "tuned")
    out = tmp_path / "tuned.safetensors"
    summary = convert_checkpoint(tmp_path / "tuned", out, base=tmp_path / "pretrained")
    assert summary.endswith("1 taken from pretrained: proj")
    assert json.loads(read_metadata(out)["filled_from"]) == {"source": "pretrained", "keys": ["proj"]}
    converted = load_state_dict(out)
    assert torch.equal(converted["proj"], clip.state_dict()["visual_projection.weight"].T)
    tuned_state = {k if k.startswith("vision_model.") else f"vision_model.{k}": v  # transformers 5: no prefix
                   for k, v in tuned.state_dict().items()}
    expected = _reference_to_open_clip({**tuned_state, "visual_projection.weight": torch.zeros(16, 32)},
                                       TINY["num_hidden_layers"])
    assert sorted(converted) == sorted(expected)
    assert all(torch.equal(converted[k], v) for k, v in expected.items() if k != "proj")
    bank = TaskVectorBank.from_checkpoints(tmp_path / "pretrained", {"tuned": out})
    assert not bank.task_vector("proj").any() and bank.task_vector("conv1.weight").any()
