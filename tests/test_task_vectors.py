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


def hand_truncated(tau: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-``rank`` truncated SVD of one task vector, by hand: U[:, :r] diag(S[:r]) Vh[:r]."""
    u, s, vh = torch.linalg.svd(tau.reshape(tau.shape[0], -1).double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def test_low_rank_reconstruction_equals_hand_svd(states):
    pre, fts = states
    bank = TaskVectorBank.from_state_dicts(pre, fts, blocks="layer")
    low = bank.low_rank(rank=3)
    # 2-D+ entries where 3 · (m + n) < m · n are factorised; 1-D entries and the rest stay exact
    expected = {e.name for e in bank.entries if len(e.shape) > 1
                and 3 * (e.shape[0] + e.numel // e.shape[0]) < e.numel}
    assert set(low.factors) == expected and "conv1.weight" in expected and "proj" in expected
    for e in bank.entries:
        for t, task in enumerate(TASKS):
            tau = fts[task][e.name] - pre[e.name]
            got = low.task_vector(e.name)[t]
            if e.name in expected:
                torch.testing.assert_close(got.double().reshape(e.shape[0], -1), hand_truncated(tau, 3),
                                           rtol=0, atol=1e-6)
                a, b = low.factors[e.name]
                torch.testing.assert_close(a[t] @ b[t], got.reshape(e.shape[0], -1), rtol=0, atol=1e-6)
            else:
                assert torch.equal(got, bank.task_vector(e.name)[t])
    assert low.low_rank_spec == {"rank": 3, "energy": None} and bank.low_rank() is bank
    merged = low.merge(torch.tensor([0.5, -1.0, 2.0]))  # merges use the reconstruction
    ref = pre["proj"] + sum(c * low.task_vector("proj")[t] for t, c in enumerate([0.5, -1.0, 2.0]))
    torch.testing.assert_close(merged["proj"], ref, rtol=0, atol=1e-6)


def test_low_rank_energy_keeps_the_fewest_triplets_reaching_the_share(states):
    pre, fts = states
    # a planted entry: task t's τ has singular values (4, 2, 1, 0, ...) scaled by t + 1
    gen = torch.Generator().manual_seed(5)
    q1, _ = torch.linalg.qr(torch.randn(32, 32, generator=gen))
    q2, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen))
    planted = {t: (t + 1) * (q1[:, :3] * torch.tensor([4.0, 2.0, 1.0])) @ q2[:3] for t in range(3)}
    name = "transformer.resblocks.0.mlp.c_proj.weight"
    fts = {task: {**fts[task], name: pre[name] + planted[t]} for t, task in enumerate(TASKS)}
    bank = TaskVectorBank.from_state_dicts(pre, fts)
    # shares of energy: 16/21, 20/21, 1
    for energy, rank in ((0.7, 1), (16 / 21, 1), (0.9, 2), (0.99, 3), (1.0, 3)):
        a, b = bank.low_rank(energy=energy).factors[name]
        assert a.shape == (3, 32, rank) and b.shape == (3, rank, 64), energy
        for t in range(3):
            torch.testing.assert_close((a[t] @ b[t]).double(), hand_truncated(planted[t], rank), rtol=0,
                                       atol=1e-5)


def test_low_rank_pads_tasks_to_the_largest_rank(states):
    pre, fts = states
    name = "transformer.resblocks.1.mlp.c_fc.weight"  # [64, 32]
    fts = {task: {**fts[task], name: pre[name] + (t + 1) * torch.outer(torch.ones(64), torch.ones(32))
                  if t < 2 else fts[task][name]} for t, task in enumerate(TASKS)}  # ranks 1, 1, full
    a, b = TaskVectorBank.from_state_dicts(pre, fts).low_rank(energy=0.5).factors[name]
    assert a.shape[2] > 1 and (a[0, :, 1:] == 0).all() and (a[1, :, 1:] == 0).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_low_rank_save_load_round_trip(states, tmp_path, dtype):
    pre, fts = states
    low = TaskVectorBank.from_state_dicts(pre, fts, blocks="layer", dtype=dtype, rank=2)
    low.save(tmp_path / "low.safetensors")
    loaded = TaskVectorBank.load(tmp_path / "low.safetensors")
    assert loaded.low_rank_spec == {"rank": 2, "energy": None} and list(loaded.factors) == list(low.factors)
    for k, (a, b) in low.factors.items():
        assert torch.equal(loaded.factors[k][0], a) and torch.equal(loaded.factors[k][1], b)
    assert loaded.vectors.dtype == low.vectors.dtype and torch.equal(loaded.vectors, low.vectors)
    assert loaded.entries == low.entries and torch.equal(loaded.base, low.base)
    # the file stores the factors, not the dense columns of the factorised entries
    dense = TaskVectorBank.from_state_dicts(pre, fts, blocks="layer", dtype=dtype)
    dense.save(tmp_path / "dense.safetensors")
    size = {k: (tmp_path / f"{k}.safetensors").stat().st_size for k in ("low", "dense")}
    assert size["low"] < 0.6 * size["dense"]
    sub = loaded.select_tasks(["dtd", "mnist"])  # derived banks keep the factors
    assert torch.equal(sub.factors["proj"][0], low.factors["proj"][0][[2, 0]])
    assert sub.to("meta").factors["proj"][1].device.type == "meta"


def test_low_rank_argument_errors(states, tmp_path):
    pre, fts = states
    bank = TaskVectorBank.from_state_dicts(pre, fts)
    for kwargs, message in (({"rank": 2, "energy": 0.9}, "rank or energy, not both"),
                            ({"rank": 0}, "rank must be a positive integer, got 0"),
                            ({"rank": 2.5}, "rank must be a positive integer, got 2.5"),
                            ({"energy": 1.5}, r"energy must be in \(0, 1\], got 1.5"),
                            ({"energy": 0.0}, r"energy must be in \(0, 1\], got 0.0")):
        with pytest.raises(ValueError, match=message):
            bank.low_rank(**kwargs)
    low = bank.low_rank(rank=2)
    with pytest.raises(ValueError, match=r"factors of 'proj' .* must be \[T, m, r\] = \[3, 32, r\]"):
        TaskVectorBank(low.vectors, low.base, low.entries, low.block_names, low.task_names,
                       factors={"proj": (low.factors["proj"][0][:, :5], low.factors["proj"][1])})
