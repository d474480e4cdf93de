"""TaskVectorBank: layout, block partitions, validation, save/load, derived banks."""

import hashlib

import pytest
import torch
from open_clip.transformer import VisionTransformer
from safetensors.torch import save_file

from vtvc_pyro import TaskVectorBank
from vtvc_pyro.checkpoints import save_state_dict

TASKS = ["mnist", "svhn", "dtd"]
# The tiny ViT below (width 32, 2 layers, mlp width 64, 16x16 images with 4x4 patches, output dim 16), its
# state-dict order written out by hand.
STEM = ["class_embedding", "positional_embedding", "conv1.weight", "ln_pre.weight", "ln_pre.bias"]
RESBLOCK = ["ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
            "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
            "mlp.c_proj.weight", "mlp.c_proj.bias"]
HEAD = ["proj", "ln_post.weight", "ln_post.bias"]
# numel: stem 32 + 17*32 + 32*3*4*4 + 32 + 32; resblock 2*32 + (96*32 + 96) + (32*32 + 32) + 2*32 +
# (64*32 + 64) + (32*64 + 32); head 32*16 + 32 + 32
STEM_SIZE, RESBLOCK_SIZE, HEAD_SIZE = 2176, 8544, 576


def tiny_vit() -> VisionTransformer:
    vit = VisionTransformer(image_size=16, patch_size=4, width=32, layers=2, heads=2, mlp_ratio=2,
                            output_dim=16)
    vit.register_buffer("step", torch.tensor(7))  # a non-float entry, carried through unchanged
    return vit


def perturbed(state: dict, seed: int, scale: float = 0.01) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
            for k, v in state.items()}


@pytest.fixture(scope="module")
def states():
    torch.manual_seed(0)
    pre = tiny_vit().state_dict()
    return pre, {task: perturbed(pre, seed) for seed, task in enumerate(TASKS)}


def test_tensor_partition_layout_matches_state_dicts(states):
    pre, fts = states
    bank = TaskVectorBank.from_state_dicts(pre, fts)
    floats = [k for k, v in pre.items() if v.is_floating_point()]
    assert bank.task_names == TASKS and bank.num_tasks == 3
    assert bank.block_names == floats and bank.param_names == floats and bank.num_blocks == len(floats)
    P = sum(pre[k].numel() for k in floats)
    assert bank.vectors.shape == (3, P) and bank.vectors.dtype == torch.float32
    assert bank.vectors.is_contiguous()
    assert bank.base.shape == (P,) and bank.num_params == P
    for b, name in enumerate(floats):
        assert bank.block_index(name) == b
        torch.testing.assert_close(bank.pretrained_tensor(name), pre[name], rtol=0, atol=0)
        expected = torch.stack([fts[t][name] - pre[name] for t in TASKS])
        torch.testing.assert_close(bank.task_vector(name), expected, rtol=0, atol=0)
    # views, not copies
    assert bank.task_vector("proj").untyped_storage().data_ptr() == bank.vectors.untyped_storage().data_ptr()
    assert "step" not in bank.param_names
    sd = bank.pretrained_state_dict()
    assert list(sd) == list(pre) and torch.equal(sd["step"], torch.tensor(7))


def test_layer_partition_matches_hand_written_blocks(states):
    pre, fts = states
    bank = TaskVectorBank.from_state_dicts(pre, fts, blocks="layer")
    assert bank.block_names == ["stem", "transformer.resblocks.0", "transformer.resblocks.1", "head"]
    expected_order = [*STEM, *(f"transformer.resblocks.0.{k}" for k in RESBLOCK),
                      *(f"transformer.resblocks.1.{k}" for k in RESBLOCK), *HEAD]
    assert bank.param_names == expected_order
    expected_block = {**dict.fromkeys(STEM, 0), **dict.fromkeys(HEAD, 3)}
    expected_block.update({f"transformer.resblocks.{i}.{k}": 1 + i for i in (0, 1) for k in RESBLOCK})
    assert {k: bank.block_index(k) for k in bank.param_names} == expected_block
    a, b, c = STEM_SIZE, STEM_SIZE + RESBLOCK_SIZE, STEM_SIZE + 2 * RESBLOCK_SIZE
    assert bank.segments == [(0, a), (a, b), (b, c), (c, c + HEAD_SIZE)]
    for name in expected_order:  # the layout change must not change the vectors
        expected = torch.stack([fts[t][name] - pre[name] for t in TASKS])
        torch.testing.assert_close(bank.task_vector(name), expected, rtol=0, atol=0)


def test_pattern_partition_first_match_wins(states):
    pre, fts = states
    patterns = [r"re:transformer\.resblocks\.\d+\.attn\..*", "transformer.*", "*"]
    bank = TaskVectorBank.from_state_dicts(pre, fts, blocks=patterns)
    assert bank.block_names == patterns
    attn = [f"transformer.resblocks.{i}.{k}" for i in (0, 1) for k in RESBLOCK if k.startswith("attn.")]
    other = [f"transformer.resblocks.{i}.{k}" for i in (0, 1) for k in RESBLOCK if not k.startswith("attn.")]
    rest = ["class_embedding", "positional_embedding", "proj", "conv1.weight", "ln_pre.weight", "ln_pre.bias",
            "ln_post.weight", "ln_post.bias"]
    assert bank.param_names == attn + other + rest
    assert {k: bank.block_index(k) for k in bank.param_names} == {
        **dict.fromkeys(attn, 0), **dict.fromkeys(other, 1), **dict.fromkeys(rest, 2)}
    attn_size = 2 * (96 * 32 + 96 + 32 * 32 + 32)
    assert bank.segments[0] == (0, attn_size)


def test_pattern_partition_errors(states):
    pre, fts = states
    with pytest.raises(ValueError, match=r"no pattern .* matches these tensors: \['class_embedding'"):
        TaskVectorBank.from_state_dicts(pre, fts, blocks=["transformer.*"])
    with pytest.raises(ValueError, match=r"match no floating-point tensor: \['nothing\.\*'\]"):
        TaskVectorBank.from_state_dicts(pre, fts, blocks=["nothing.*", "*"])
    with pytest.raises(ValueError, match="'tensor', 'layer' or a list of name patterns, got 'blocks'"):
        TaskVectorBank.from_state_dicts(pre, fts, blocks="blocks")
    with pytest.raises(ValueError, match="invalid block regex 're:\\('"):
        TaskVectorBank.from_state_dicts(pre, fts, blocks=["re:(", "*"])
    odd = {**pre, "pos_scale": torch.ones(2)}
    with pytest.raises(ValueError, match=r"blocks='layer' does not know .*\['pos_scale'\]"):
        TaskVectorBank.from_state_dicts(odd, {"a": odd}, blocks="layer")


def test_validation_names_the_offending_key(states):
    pre, fts = states
    good = fts["mnist"]
    missing = {k: v for k, v in good.items() if k != "ln_post.bias"}
    with pytest.raises(ValueError, match=r"task 'bad': .*lacks pre-trained keys \['ln_post.bias'\]"):
        TaskVectorBank.from_state_dicts(pre, {"ok": good, "bad": missing})
    with pytest.raises(ValueError, match=r"keys the pre-trained one lacks \['extra'\]"):
        TaskVectorBank.from_state_dicts(pre, {"bad": {**good, "extra": torch.ones(1)}})
    wrong = {**good, "proj": torch.zeros(16, 32)}
    with pytest.raises(ValueError, match=r"shape mismatch \['proj: \(16, 32\) vs pre-trained \(32, 16\)"):
        TaskVectorBank.from_state_dicts(pre, {"bad": wrong})
    nan = {k: v.clone() for k, v in good.items()}
    nan["transformer.resblocks.1.mlp.c_fc.bias"][3] = float("nan")
    with pytest.raises(ValueError, match=r"'bad': 'transformer.resblocks.1.mlp.c_fc.bias' .*non-finite.*nan"):
        TaskVectorBank.from_state_dicts(pre, {"bad": nan})
    inf_pre = {**pre, "class_embedding": torch.full((32,), float("inf"))}
    with pytest.raises(ValueError, match=r"pre-trained state dict: 'class_embedding' .*non-finite.*inf"):
        TaskVectorBank.from_state_dicts(inf_pre, {"a": good})
    with pytest.raises(ValueError, match=r"not tensors: \['proj'\]"):
        TaskVectorBank.from_state_dicts(pre, {"bad": {**good, "proj": [[0.0]]}})
    with pytest.raises(ValueError, match="at least one fine-tuned"):
        TaskVectorBank.from_state_dicts(pre, {})
    with pytest.raises(ValueError, match="storage dtype must be one of .* got 'float64'"):
        TaskVectorBank.from_state_dicts(pre, fts, dtype="float64")


def test_low_precision_storage(states):
    pre, fts = states
    for dtype, expected in (("bfloat16", torch.bfloat16), (torch.float16, torch.float16)):
        bank = TaskVectorBank.from_state_dicts(pre, fts, dtype=dtype)
        assert bank.vectors.dtype == expected and bank.base.dtype == torch.float32
        exact = torch.stack([fts[t]["proj"] - pre["proj"] for t in TASKS])
        torch.testing.assert_close(bank.task_vector("proj").float(), exact, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip(states, tmp_path, mmap):
    pre, fts = states
    bank = TaskVectorBank.from_state_dicts(pre, fts, blocks="layer", dtype="bfloat16")
    bank.save(tmp_path / "bank.safetensors")
    loaded = TaskVectorBank.load(tmp_path / "bank.safetensors", mmap=mmap)
    assert loaded.task_names == TASKS and loaded.block_names == bank.block_names
    assert loaded.entries == bank.entries and loaded.segments == bank.segments
    assert loaded.vectors.dtype == torch.bfloat16 and torch.equal(loaded.vectors, bank.vectors)
    assert torch.equal(loaded.base, bank.base)
    sd = loaded.pretrained_state_dict()
    assert list(sd) == list(pre) and torch.equal(sd["step"], pre["step"])
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left no temporary file


def test_from_checkpoints_records_checksums(states, tmp_path):
    pre, fts = states
    save_state_dict(pre, tmp_path / "zeroshot.safetensors")
    paths = {}
    for task in TASKS:  # a mix of formats: safetensors and a wrapped, DDP-prefixed torch file
        if task == "svhn":
            paths[task] = tmp_path / f"{task}.pt"
            torch.save({"state_dict": {f"module.{k}": v for k, v in fts[task].items()}}, paths[task])
        else:
            paths[task] = tmp_path / f"{task}.safetensors"
            save_state_dict(fts[task], paths[task])
    bank = TaskVectorBank.from_checkpoints(tmp_path / "zeroshot.safetensors", paths, dtype="float32")
    reference = TaskVectorBank.from_state_dicts(pre, fts)
    assert torch.equal(bank.vectors, reference.vectors)
    for task, path in paths.items():
        assert bank.sources[task]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert bank.sources["pretrained"]["sha256"] == hashlib.sha256(
        (tmp_path / "zeroshot.safetensors").read_bytes()).hexdigest()
    bank.save(tmp_path / "bank.safetensors")
    assert TaskVectorBank.load(tmp_path / "bank.safetensors").sources == bank.sources


def test_load_errors(states, tmp_path):
    pre, fts = states
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        TaskVectorBank.load(tmp_path / "nope.safetensors")
    save_file({"x": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="plain.safetensors' is a safetensors file but not a TaskVectorBank"):
        TaskVectorBank.load(tmp_path / "plain.safetensors")
    TaskVectorBank.from_state_dicts(pre, fts).save(tmp_path / "bank.safetensors")
    data = (tmp_path / "bank.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.safetensors' .*truncated or corrupt"):
        TaskVectorBank.load(tmp_path / "cut.safetensors")


def test_select_tasks_and_to(states):
    pre, fts = states
    bank = TaskVectorBank.from_state_dicts(pre, fts)
    sub = bank.select_tasks(["dtd", "mnist"])
    assert sub.task_names == ["dtd", "mnist"] and sub.vectors.is_contiguous()
    torch.testing.assert_close(sub.task_vector("proj"), torch.stack(
        [fts["dtd"]["proj"] - pre["proj"], fts["mnist"]["proj"] - pre["proj"]]), rtol=0, atol=0)
    with pytest.raises(KeyError, match="unknown tasks \\['cars'\\]"):
        bank.select_tasks(["cars"])
    with pytest.raises(KeyError, match="'nope' is not a floating-point entry"):
        bank.task_vector("nope")
    assert bank.to("cpu") is bank
    moved = bank.to("meta")
    assert moved.device.type == "meta" and moved.base.device.type == "meta" and moved.task_names == TASKS
