"""Merge kernels (torch, Triton via the interpreter) against the naive per-tensor formula, and the classic
merges (task arithmetic, TIES) against hand-worked examples and a per-entry reference loop."""

import numpy as np
import pytest
import torch
from open_clip.transformer import VisionTransformer

from vtvc_pyro import TaskVectorBank
from vtvc_pyro.merge import merge_flat, task_arithmetic, ties_merging

TASKS = ["a", "b", "c"]


def tiny_vit() -> VisionTransformer:
    vit = VisionTransformer(image_size=16, patch_size=4, width=32, layers=2, heads=2, mlp_ratio=2,
                            output_dim=16)
    vit.register_buffer("step", torch.tensor(7))  # a non-float entry
    return vit


def layer_of(name: str) -> int:
    """Hand-written 'layer' partition of the tiny ViT: stem 0, resblock i -> 1 + i, head 3."""
    if name.startswith("transformer.resblocks."):
        return 1 + int(name.split(".")[2])
    return 3 if name.split(".")[0] in ("proj", "ln_post") else 0


@pytest.fixture(scope="module")
def states():
    torch.manual_seed(0)
    vit = tiny_vit()
    pre = {k: v.clone() for k, v in vit.state_dict().items()}  # not views: the tests load into `vit`
    gen = torch.Generator().manual_seed(1)
    fts = {t: {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
               for k, v in pre.items()} for t in TASKS}
    return vit, pre, fts


def naive_merge(pre: dict, fts: dict, coef: torch.Tensor, block_of) -> dict:
    """θ0[k] + Σ_t coef[t, b(k)] · τ_t[k], one tensor and one task at a time."""
    out = {}
    for k, theta0 in pre.items():
        if not theta0.is_floating_point():
            out[k] = theta0
            continue
        acc = theta0.double()
        for t, task in enumerate(TASKS):
            c = coef[t] if coef.dim() == 1 else coef[t, block_of(k)]
            acc = acc + float(c) * (fts[task][k].double() - theta0.double())
        out[k] = acc.float()
    return out


def assert_state_close(got: dict, expected: dict, atol: float) -> None:
    assert list(got) == list(expected)
    for k in expected:
        assert got[k].dtype == expected[k].dtype, k
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=atol, msg=k)


@pytest.mark.parametrize("blocks", ["tensor", "layer"])
@pytest.mark.parametrize("per_block", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton", "compiled"])
def test_merge_equals_naive_formula(states, blocks, per_block, backend):
    vit, pre, fts = states
    bank = TaskVectorBank.from_state_dicts(pre, fts, blocks=blocks)
    floats = [k for k, v in pre.items() if v.is_floating_point()]
    block_of = floats.index if blocks == "tensor" else layer_of
    gen = torch.Generator().manual_seed(2)
    coef = torch.randn((3, bank.num_blocks) if per_block else (3,), generator=gen)
    merged = bank.merge(coef, backend=backend)
    assert_state_close(merged, naive_merge(pre, fts, coef, block_of), atol=1e-6)
    vit.load_state_dict(merged)  # loadable into the encoder, non-float entry included


@pytest.mark.parametrize("backend", ["torch", "triton", "compiled"])
def test_merge_bf16_storage(states, backend):
    _, pre, fts = states
    bank = TaskVectorBank.from_state_dicts(pre, fts, blocks="layer", dtype="bfloat16")
    coef = torch.tensor([[0.3, -0.7, 1.1, 0.5], [0.2, 0.4, -0.6, 0.9], [-1.0, 0.1, 0.8, 0.25]])
    # bf16 keeps 8 significant bits: |τ| ≲ 0.25 here, so each term errs by ≲ 1.1 · 0.25 · 2^-8
    assert_state_close(bank.merge(coef, backend=backend), naive_merge(pre, fts, coef, layer_of), atol=4e-3)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_triton_kernel_equals_torch_path(states, dtype):
    _, pre, fts = states
    bank = TaskVectorBank.from_state_dicts(pre, fts, blocks="layer", dtype=dtype)
    coef = torch.randn(3, bank.num_blocks, generator=torch.Generator().manual_seed(3))
    # segments that do not cover the whole buffer (columns outside keep θ0) and cross several chunks
    segments = [(10, 2100), (2100, 9000), (12000, 19840)]
    torch_out = merge_flat(bank.base, bank.vectors, coef[:, :3], segments, backend="torch")
    triton_out = merge_flat(bank.base, bank.vectors, coef[:, :3], segments, backend="triton")
    torch.testing.assert_close(triton_out, torch_out, rtol=0, atol=1e-6)
    for c in (coef[:, :3], coef[:, 0]):  # per block and per task
        for backend in ("torch", "triton", "compiled"):
            out = merge_flat(bank.base, bank.vectors, c, segments, backend=backend)
            torch.testing.assert_close(out[:10], bank.base[:10], rtol=0, atol=0)
            torch.testing.assert_close(out[9000:12000], bank.base[9000:12000], rtol=0, atol=0)
            c0 = c[:, 0] if c.dim() == 2 else c
            expected = bank.base[10:20] + c0 @ bank.vectors[:, 10:20].float()
            torch.testing.assert_close(out[10:20], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton", "compiled"])
def test_merge_into_a_reused_buffer(states, backend):
    _, pre, fts = states
    bank = TaskVectorBank.from_state_dicts(pre, fts)
    out = torch.full((bank.num_params,), float("nan"))  # stale contents must not leak into the result
    for coef in (torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.0, 1.0, 0.0])):
        merged = bank.merge(coef, backend=backend, out=out)
        assert all(merged[k].untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
                   for k in bank.param_names)
        assert_state_close(merged, naive_merge(pre, fts, coef, None), atol=1e-6)
    with pytest.raises(ValueError, match=r"out must be a contiguous float32 \[P\] = \[19840\] tensor"):
        bank.merge(torch.ones(3), out=torch.empty(10))
    with pytest.raises(ValueError, match="out must not share memory with base"):
        bank.merge(torch.ones(3), out=bank.base)


def test_compiled_backend_calls_the_kernel_once_per_large_segment_and_once_for_the_small_ones(
        states, monkeypatch):
    # per-block coefficients: one call per segment of at least SMALL_SEGMENT columns, one gathered call for
    # all the shorter ones; one coefficient per task: one call per run of adjacent segments (here the whole
    # buffer); auto picks the kernel from AUTO_MIN_ELEMENTS on
    import vtvc_pyro.compiled_merge as compiled

    _, pre, fts = states
    bank = TaskVectorBank.from_state_dicts(pre, fts)  # one block per tensor: sizes from 16 to 4096
    kernel, gathered, calls, gathered_columns = compiled._kernel(), compiled._gathered_kernel(), [], []

    def spy(*args):
        calls.append(args[-2:])
        return kernel(*args)

    def gathered_spy(base, vectors, coef, columns, blocks):
        gathered_columns.append(columns.tolist())
        return gathered(base, vectors, coef, columns, blocks)

    monkeypatch.setattr(compiled, "_kernel", lambda: spy)
    monkeypatch.setattr(compiled, "_gathered_kernel", lambda: gathered_spy)
    monkeypatch.setattr(compiled, "SMALL_SEGMENT", 1000)
    floats = [k for k, v in pre.items() if v.is_floating_point()]
    coef = torch.randn(3, bank.num_blocks, generator=torch.Generator().manual_seed(4))
    assert_state_close(bank.merge(coef, backend="compiled"), naive_merge(pre, fts, coef, floats.index),
                       atol=1e-6)
    large = [(s, e) for s, e in bank.segments if e - s >= 1000]
    small = [(s, e) for s, e in bank.segments if e - s < 1000]
    assert len(large) >= 2 and len(small) >= 2
    assert sorted(calls) == sorted(large)
    assert gathered_columns == [[c for s, e in sorted(small) for c in range(s, e)]]
    calls.clear()
    gathered_columns.clear()
    bank.merge(torch.tensor([0.5, -1.0, 2.0]), backend="compiled")
    assert calls == [(0, bank.num_params)] and gathered_columns == []
    calls.clear()
    bank.merge(torch.tensor([0.5, -1.0, 2.0]))  # a small bank: eager torch
    assert calls == []
    monkeypatch.setattr("vtvc_pyro.merge.AUTO_MIN_ELEMENTS", 0)
    bank.merge(torch.tensor([0.5, -1.0, 2.0]))
    assert calls == [(0, bank.num_params)]


def test_auto_merge_falls_back_to_eager_torch_where_compiling_fails(states, monkeypatch, caplog):
    import vtvc_pyro.compiled_merge as compiled

    _, pre, fts = states
    bank = TaskVectorBank.from_state_dicts(pre, fts)

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no working C++ compiler\n(details)")

    monkeypatch.setattr("vtvc_pyro.merge.AUTO_MIN_ELEMENTS", 0)
    monkeypatch.setattr(compiled, "_failed", False)
    monkeypatch.setattr(compiled, "_kernel", lambda: no_compiler)
    coef = torch.tensor([0.5, -1.0, 2.0])
    with caplog.at_level("WARNING"):
        first = bank.merge(coef)
        second = bank.merge(coef)
    assert [r.getMessage() for r in caplog.records] == [
        "torch.compile could not build the fused merge (RuntimeError: no working C++ compiler); merging "
        "with eager torch"]  # once, and not tried again
    for merged in (first, second):
        assert_state_close(merged, naive_merge(pre, fts, coef, None), atol=1e-6)
    with pytest.raises(RuntimeError, match="no working C"):  # asked for by name: the error, not a fallback
        bank.merge(coef, backend="compiled")


def test_bad_coefficients_raise(states):
    _, pre, fts = states
    bank = TaskVectorBank.from_state_dicts(pre, fts, blocks="layer")
    shape_error = r"coef must have shape \[T\] = \[3\] or \[T, B\] = \[3, 4\], got \[4\]"
    with pytest.raises(ValueError, match=shape_error):
        bank.merge(torch.ones(4))
    with pytest.raises(ValueError, match=r"got \[3, 5\]"):
        bank.merge(torch.ones(3, 5))
    with pytest.raises(ValueError, match=r"got \[2, 3, 4\]"):
        bank.merge(torch.ones(2, 3, 4))
    coef = torch.ones(3, 4)
    coef[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"coef\[1, 2\] = nan is not finite"):
        bank.merge(coef)
    with pytest.raises(ValueError, match=r"coef\[0\] = -inf is not finite"):
        bank.merge([float("-inf"), 0.0, 0.0])
    with pytest.raises(ValueError, match="backend must be one of .* got 'cuda'"):
        bank.merge(torch.ones(3), backend="cuda")


# ---------------------------------------------------------------------------- hand-worked classic merges

# θ0: a = [1, -1], b = [[0, 2], [0.5, 0]] (flattened: 1, -1, 0, 2, 0.5, 0), n = 7 (an integer buffer).
PRE = {"a": torch.tensor([1.0, -1.0]), "b": torch.tensor([[0.0, 2.0], [0.5, 0.0]]), "n": torch.tensor(7)}
TAUS = [[3.0, 1.5, 0.5, -2.0, 0.1, 0.2],
        [-2.5, -1.5, -4.0, 0.1, 0.3, 0.2],
        [0.1, 0.2, 1.0, 3.0, 5.0, 0.3]]


@pytest.fixture
def hand_bank() -> TaskVectorBank:
    base = torch.cat([PRE["a"], PRE["b"].reshape(-1)])
    fts = {}
    for t, tau in zip(TASKS, TAUS, strict=True):
        flat = base + torch.tensor(tau)
        fts[t] = {"a": flat[:2], "b": flat[2:].reshape(2, 2), "n": torch.tensor(7)}
    return TaskVectorBank.from_state_dicts(PRE, fts)


def test_task_arithmetic_hand_worked(hand_bank):
    # Σ_t τ_t = [0.6, 0.2, -2.5, 1.1, 5.4, 0.7]; θ0 + 0.5 · Σ:
    merged = task_arithmetic(hand_bank, 0.5)
    torch.testing.assert_close(merged["a"], torch.tensor([1.3, -0.9]), rtol=0, atol=1e-6)
    torch.testing.assert_close(merged["b"], torch.tensor([[-1.25, 2.55], [3.2, 0.35]]), rtol=0, atol=1e-6)
    assert torch.equal(merged["n"], torch.tensor(7))


def test_ties_hand_worked(hand_bank):
    # top_k = 0.5 of P = 6 keeps 3 entries per task:
    #   trimmed τ1 = [3, 1.5, 0, -2, 0, 0], τ2 = [-2.5, -1.5, -4, 0, 0, 0], τ3 = [0, 0, 1, 3, 5, 0]
    # summed mass [0.5, 0, -3, 1, 5, 0] -> signs [+, 0, -, +, +, 0]; the zero signs take the majority (+)
    # disjoint mean of the agreeing entries: [3, 1.5, -4, 3, 5, 0]; θ0 + 0.5 · that:
    merged = ties_merging(hand_bank, top_k=0.5, alpha=0.5)
    torch.testing.assert_close(merged["a"], torch.tensor([2.5, -0.25]), rtol=0, atol=1e-6)
    torch.testing.assert_close(merged["b"], torch.tensor([[-2.0, 3.5], [3.0, 0.0]]), rtol=0, atol=1e-6)
    assert torch.equal(merged["n"], torch.tensor(7))


def naive_ties(base: np.ndarray, taus: np.ndarray, top_k: float, alpha: float) -> np.ndarray:
    """TIES one entry at a time: trim to the top-k magnitudes, elect sign by mass, disjoint mean."""
    T, P = taus.shape
    keep = int(P * top_k)
    trimmed = np.zeros_like(taus)
    for t in range(T):
        for i in np.argsort(-np.abs(taus[t]))[:keep]:
            trimmed[t, i] = taus[t, i]
    signs = [float(np.sign(sum(trimmed[t, i] for t in range(T)))) for i in range(P)]
    majority = float(np.sign(sum(signs)))
    out = base.copy()
    for i in range(P):
        sign = signs[i] if signs[i] != 0 else majority
        agree = [trimmed[t, i] for t in range(T) if trimmed[t, i] * sign > 0]
        out[i] += alpha * (sum(agree) / len(agree) if agree else 0.0)
    return out


@pytest.mark.parametrize("top_k", [0.2, 0.7])
def test_ties_equals_per_entry_reference(states, top_k):
    _, pre, fts = states
    bank = TaskVectorBank.from_state_dicts(pre, fts)
    floats = [k for k, v in pre.items() if v.is_floating_point()]
    base = torch.cat([pre[k].reshape(-1) for k in floats]).double().numpy()
    taus = np.stack([torch.cat([fts[t][k].reshape(-1) for k in floats]).double().numpy() - base
                     for t in TASKS])
    expected = naive_ties(base, taus, top_k, alpha=0.7)
    merged = ties_merging(bank, top_k=top_k, alpha=0.7)
    got = torch.cat([merged[k].reshape(-1) for k in floats]).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert torch.equal(merged["step"], pre["step"])


def test_classic_merge_arguments(hand_bank):
    with pytest.raises(ValueError, match="top_k .* in \\(0, 1\\], got 20"):
        ties_merging(hand_bank, top_k=20)
    with pytest.raises(ValueError, match="alpha must be finite, got nan"):
        task_arithmetic(hand_bank, float("nan"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_chunked_low_precision_merge_equals_naive_formula(states, dtype, monkeypatch):
    # chunks of 7 columns: every segment boundary and chunk boundary falls somewhere else; the reference is
    # the naive formula over the bank's own stored (rounded) task vectors, in float64
    import vtvc_pyro.merge as merge_module

    _, pre, fts = states
    monkeypatch.setattr(merge_module, "_WIDEN_CHUNK", 7)
    bank = TaskVectorBank.from_state_dicts(pre, fts, blocks="layer", dtype=dtype)
    stored = {t: {k: (bank.pretrained_tensor(k).double() + bank.task_vector(k)[i].double())
                  for k in bank.param_names} for i, t in enumerate(TASKS)}
    stored_pre = {k: bank.pretrained_tensor(k) for k in bank.param_names}
    for coef in (torch.tensor([0.5, -1.0, 2.0]), torch.randn(3, bank.num_blocks)):
        got = bank.merge(coef, backend="torch")
        expected = naive_merge(stored_pre, stored, coef, layer_of)
        for k in bank.param_names:
            torch.testing.assert_close(got[k], expected[k], rtol=0, atol=2e-6, msg=k)
