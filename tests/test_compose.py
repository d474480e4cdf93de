"""ComposedEncoder against independent references: a per-sample loop of ``functional_call`` with merged
weights (values), the same loop with weights merged by hand from the state dicts (gradients), the plain tower
(zero coefficients), closed-form GEMM counts (sparsity), and the errors for unsupported towers and inputs."""

import collections

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU, VisionTransformer
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

from vtvc_pyro import ComposedEncoder, TaskVectorBank

TOL = 1e-5
TOWERS = {
    "gelu": dict(image_size=16, patch_size=4, width=32, layers=2, heads=4, mlp_ratio=2, output_dim=24),
    "quickgelu-layerscale": dict(image_size=12, patch_size=3, width=24, layers=3, heads=2, mlp_ratio=3,
                                 output_dim=16, act_layer=QuickGELU, ls_init_value=0.1),
    "avg-pool-no-ln-pre": dict(image_size=(16, 8), patch_size=(4, 2), width=16, layers=1, heads=1,
                               mlp_ratio=4, output_dim=8, pool_type="avg", final_ln_after_pool=True,
                               no_ln_pre=True, pos_embed_type="sin_cos_2d"),
    "avg-pool-ln-first": dict(image_size=8, patch_size=2, width=16, layers=2, heads=8, mlp_ratio=1,
                              output_dim=12, pool_type="avg", ls_init_value=1.0),
}
MODES = ("composed", "sparse", "materialise", "auto")


def make_tower(name: str, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(**TOWERS[name]).eval()


def finetuned(state: dict, num_tasks: int, seed: int = 1, scale: float = 0.2) -> dict[str, dict]:
    """Fine-tuned stand-ins: every float tensor of ``state`` perturbed at random."""
    gen = torch.Generator().manual_seed(seed)
    return {f"task{t}": {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in state.items()}
            for t in range(num_tasks)}


def images_for(visual: VisionTransformer, n: int, seed: int = 2) -> torch.Tensor:
    h, w = visual.image_size
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def sparse_coef(n: int, t: int, b: int, seed: int = 3) -> torch.Tensor:
    """Gaussian coefficients with exact zeros of every kind: single entries, whole blocks (for the whole
    batch), whole tasks in a block, and one sample with all zeros."""
    gen = torch.Generator().manual_seed(seed)
    coef = torch.randn(n, t, b, generator=gen)
    coef = coef * (torch.rand(n, t, b, generator=gen) < 0.6)
    coef = coef * (torch.rand(1, t, b, generator=gen) < 0.7)
    coef[:, :, ::3] = 0.0
    coef[-1] = 0.0
    return coef


def oracle(visual: nn.Module, bank: TaskVectorBank, images: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Per-sample loop: merge the weights of sample n, then a batch-1 forward of the tower."""
    return torch.cat([functional_call(visual, bank.merge(coef[n]), (images[n:n + 1],))
                      for n in range(images.shape[0])])


def hand_merge(pre: dict, fts: dict, bank: TaskVectorBank, coef_n: torch.Tensor) -> dict:
    """θ0 + Σ_t coef_n[t, b(k)] (θ_t − θ0)[k] from the state dicts themselves; differentiable."""
    out = {}
    for k, v in pre.items():
        b = bank.block_index(k)
        out[k] = v + sum(coef_n[t, b] * (ft[k] - v) for t, ft in enumerate(fts.values()))
    return out


def setup(tower: str, blocks: str = "tensor", num_tasks: int = 3, dtype=torch.float32):
    visual = make_tower(tower)
    pre = visual.state_dict()
    fts = finetuned(pre, num_tasks)
    return visual, pre, fts, TaskVectorBank.from_state_dicts(pre, fts, blocks=blocks, dtype=dtype)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("blocks", ["tensor", "layer"])
@pytest.mark.parametrize("tower", list(TOWERS))
def test_matches_per_sample_oracle(tower, blocks, mode):
    visual, _, _, bank = setup(tower, blocks)
    x = images_for(visual, 5)
    coef = sparse_coef(5, bank.num_tasks, bank.num_blocks)
    with torch.no_grad():
        out = ComposedEncoder(visual, bank, mode=mode)(x, coef)
        ref = oracle(visual, bank, x, coef)
    assert ref.abs().max() > 0.5  # a meaningful output scale for the tolerance
    assert max_diff(out, ref) <= TOL * ref.abs().max().item()  # float32 rounding, summed in other orders


@pytest.mark.parametrize("mode", MODES)
def test_uniform_coefficients_equal_merged_model(mode):
    visual, pre, fts, bank = setup("quickgelu-layerscale", num_tasks=5)
    x = images_for(visual, 4)
    alpha = 0.3
    merged = {k: v + alpha * sum(ft[k] - v for ft in fts.values()) for k, v in pre.items()}
    with torch.no_grad():
        ref = functional_call(visual, merged, (x,))
        enc = ComposedEncoder(visual, bank, mode=mode)
        for coef in (torch.full((5,), alpha), torch.full((5, bank.num_blocks), alpha),
                     torch.full((4, 5, bank.num_blocks), alpha)):
            assert max_diff(enc(x, coef), ref) <= TOL


def test_zero_coefficients_equal_pretrained_tower():
    visual, _, _, bank = setup("gelu", num_tasks=2)
    x = images_for(visual, 3)
    enc = ComposedEncoder(visual, bank)
    with torch.no_grad():
        ref = visual(x)
        assert max_diff(enc(x, torch.zeros(3, 2, bank.num_blocks)), ref) <= TOL
        assert max_diff(enc(x, torch.zeros(2)), ref) <= TOL


@pytest.mark.parametrize("mode", MODES)
def test_sparse_sample_alone_equals_dense_batch(mode):
    # alone, most of sample 0's components are skipped; beside a dense sample none are
    visual, _, _, bank = setup("gelu", num_tasks=3)
    x = images_for(visual, 2)
    coef = sparse_coef(2, 3, bank.num_blocks)
    coef[1] = torch.randn(3, bank.num_blocks)
    enc = ComposedEncoder(visual, bank, mode=mode)
    with torch.no_grad():
        assert max_diff(enc(x[:1], coef[:1]), enc(x, coef)[:1]) <= TOL
        assert max_diff(enc(x[:1], coef[:1]), oracle(visual, bank, x[:1], coef[:1])) <= TOL


class CountGemms(TorchDispatchMode):
    """Counts matrix-multiply kernels (mm, addmm, bmm; in-place included)."""

    GEMMS = {"mm", "addmm", "addmm_", "bmm", "baddbmm"}

    def __init__(self):
        super().__init__()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.GEMMS:
            self.count[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("active", [0, 1, 2, 4])
def test_cost_grows_with_active_task_vectors_only(active):
    # composed: 1 + k GEMMs per linear layer with k active task vectors, whatever T is;
    # the tiny tower has conv1 + proj + 4 per residual block = 2 + 4 * 2 = 10 linear layers
    visual, _, _, bank = setup("gelu", num_tasks=5)
    suffixes = ("conv1.weight", "proj", "in_proj_weight", "out_proj.weight", "c_fc.weight", "c_proj.weight")
    weights = [k for k in bank.param_names if k.endswith(suffixes)]
    assert len(weights) == 10
    coef = torch.zeros(6, 5, bank.num_blocks)
    for k in weights:
        coef[:, :active, bank.block_index(k)] = torch.randn(6, active)
    coef[0] = 0.0  # a zero row does not make a block cheaper or dearer
    with torch.no_grad(), CountGemms() as counter:
        ComposedEncoder(visual, bank, mode="composed")(images_for(visual, 6), coef)
    assert sum(counter.count.values()) == 10 * (1 + active)


def test_auto_forms_per_sample_weights_only_without_autograd():
    # dense coefficients over many tokens: forming per-sample weights (bmm) beats 1 + T GEMMs per layer,
    # but under autograd it would keep a weight copy per sample alive, so auto stays composed there
    visual = VisionTransformer(**{**TOWERS["gelu"], "image_size": 32}).eval()
    pre = visual.state_dict()
    bank = TaskVectorBank.from_state_dicts(pre, finetuned(pre, 8))
    x, coef = images_for(visual, 3), 0.3 * torch.randn(3, 8, bank.num_blocks)
    enc = ComposedEncoder(visual, bank)
    with torch.no_grad(), CountGemms() as no_grad:
        out = enc(x, coef)
    with CountGemms() as with_grad:
        out_grad = enc(x, coef.requires_grad_(True))
    assert no_grad.count["bmm"] > 0 and with_grad.count["bmm"] == 0
    assert max_diff(out, out_grad.detach()) <= TOL
    with torch.no_grad():
        assert max_diff(out, oracle(visual, bank, x, coef)) <= TOL


def oracle_grad(visual, pre, fts, bank, x, coef, target):
    ref_coef = coef.detach().clone().requires_grad_(True)
    ref = torch.cat([functional_call(visual, hand_merge(pre, fts, bank, ref_coef[n]), (x[n:n + 1],))
                     for n in range(x.shape[0])])
    return ref.detach(), torch.autograd.grad((ref * target).sum(), ref_coef)[0]


@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_oracle(mode):
    visual, pre, fts, bank = setup("quickgelu-layerscale", blocks="tensor", num_tasks=3)
    x = images_for(visual, 4)
    target = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    coef = sparse_coef(4, 3, bank.num_blocks).requires_grad_(True)
    out = ComposedEncoder(visual, bank, mode=mode)(x, coef)
    (grad,) = torch.autograd.grad((out * target).sum(), coef)
    ref, ref_grad = oracle_grad(visual, pre, fts, bank, x, coef, target)
    assert max_diff(out.detach(), ref) <= TOL
    skipped = (coef == 0).all(dim=0)
    assert skipped.sum() > 10 and ref_grad[:, skipped].abs().max() > 0.1  # exact at zeros too
    assert max_diff(grad, ref_grad) <= TOL


@pytest.mark.parametrize("mode", MODES)
def test_sparse_grad_skips_zero_components_under_autograd(mode):
    # sparse_grad: every zero coefficient (per sample too) gets gradient 0 whatever the path, the others
    # their exact gradient
    visual, pre, fts, bank = setup("quickgelu-layerscale", blocks="tensor", num_tasks=3)
    x = images_for(visual, 4)
    target = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    coef = sparse_coef(4, 3, bank.num_blocks).requires_grad_(True)
    with CountGemms() as sparse_count:
        out = ComposedEncoder(visual, bank, mode=mode, sparse_grad=True)(x, coef)
    with CountGemms() as dense_count:
        ComposedEncoder(visual, bank)(x, coef)
    assert sum(sparse_count.count.values()) < sum(dense_count.count.values())
    (grad,) = torch.autograd.grad((out * target).sum(), coef)
    ref, ref_grad = oracle_grad(visual, pre, fts, bank, x, coef, target)
    zero = coef == 0
    assert max_diff(out.detach(), ref) <= TOL
    assert (grad[zero] == 0).all() and ref_grad[zero].abs().max() > 0.1
    assert max_diff(grad[~zero], ref_grad[~zero]) <= TOL


def test_gradient_of_shared_coefficients():
    visual, pre, fts, bank = setup("gelu", blocks="layer", num_tasks=2)
    x = images_for(visual, 3)
    coef = torch.tensor([[0.5, 0.0, -0.2, 0.1], [0.0, 0.0, 0.3, 1.0]], requires_grad=True)
    (grad,) = torch.autograd.grad(ComposedEncoder(visual, bank)(x, coef).square().sum(), coef)
    ref_coef = coef.detach().clone().requires_grad_(True)
    ref = functional_call(visual, hand_merge(pre, fts, bank, ref_coef), (x,))
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), ref_coef)
    assert max_diff(grad, ref_grad) <= 1e-4 * ref_grad.abs().max().item()


@pytest.mark.parametrize("mode", MODES)
def test_gradient_with_respect_to_images(mode):
    visual, _, _, bank = setup("gelu", num_tasks=3)
    x = images_for(visual, 3).requires_grad_(True)
    coef = sparse_coef(3, 3, bank.num_blocks)
    (grad,) = torch.autograd.grad(ComposedEncoder(visual, bank, mode=mode)(x, coef).square().sum(), x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = oracle(visual, bank, ref_x, coef)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), ref_x)
    assert max_diff(grad, ref_grad) <= 1e-4 * ref_grad.abs().max().item()


def test_encoder_holds_no_parameters_and_constants_get_no_gradient():
    visual, _, _, bank = setup("gelu", num_tasks=2)
    enc = ComposedEncoder(visual, bank)
    assert list(enc.parameters()) == []
    assert enc.state_dict() == {}
    coef = torch.ones(2, 2, bank.num_blocks, requires_grad=True)
    enc(images_for(visual, 2), coef).sum().backward()
    assert coef.grad is not None
    assert not enc.base.requires_grad and enc.base.grad is None
    assert not enc.vectors.requires_grad and enc.vectors.grad is None


def test_low_precision_storage_and_compute():
    visual, _, _, bank = setup("gelu", num_tasks=3, dtype=torch.bfloat16)
    x = images_for(visual, 3)
    coef = sparse_coef(3, 3, bank.num_blocks)
    with torch.no_grad():
        ref = oracle(visual, bank, x, coef)  # bank.merge accumulates bf16 task vectors in float32
        assert max_diff(ComposedEncoder(visual, bank)(x, coef), ref) <= TOL
        low = ComposedEncoder(visual, bank, dtype=torch.bfloat16)(x, coef)
    assert low.dtype == torch.bfloat16
    assert max_diff(low.float(), ref) <= 0.1 * ref.abs().max().item()


def test_to_device_and_dtype_moves_the_constants():
    visual, _, _, bank = setup("gelu", num_tasks=2)
    enc = ComposedEncoder(visual, bank).to(torch.float64)
    assert enc.base.dtype == torch.float64
    x = images_for(visual, 2)
    coef = sparse_coef(2, 2, bank.num_blocks)
    with torch.no_grad():
        assert enc(x, coef).dtype == torch.float64
        assert max_diff(enc(x, coef).float(), oracle(visual, bank, x, coef)) <= TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    visual, _, _, bank = setup("quickgelu-layerscale", num_tasks=3)
    x = images_for(visual, 4)
    coef = sparse_coef(4, 3, bank.num_blocks)
    with torch.no_grad():
        ref = oracle(visual, bank, x, coef)
        for mode in MODES:
            out = ComposedEncoder(visual, bank.to("cuda"), mode=mode)(x.cuda(), coef.cuda())
            assert out.is_cuda
            assert max_diff(out.cpu(), ref) <= 1e-4  # TF32 and other kernels


UNSUPPORTED = {
    "attentional_pool": dict(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2),
    "patch dropout": dict(patch_dropout=0.5),
    "qk_norm": dict(qk_norm=True),
    "scaled_cosine_attn": dict(scaled_cosine_attn=True),
    "scale_heads": dict(scale_heads=True),
    "scale_attn": dict(scale_attn=True),
    "scale_fc": dict(scale_fc=True),
    "block_type='custom'": dict(block_type="custom"),
    "pool_type='none'": dict(pool_type="none"),
    "output_tokens": dict(output_tokens=True),
}


@pytest.mark.parametrize("feature", list(UNSUPPORTED))
def test_unsupported_tower_features_raise_at_construction(feature):
    visual = VisionTransformer(**{**TOWERS["gelu"], **UNSUPPORTED[feature]}).eval()
    pre = visual.state_dict()
    bank = TaskVectorBank.from_state_dicts(pre, finetuned(pre, 1))
    with pytest.raises(ValueError, match=f"does not support.*{feature.split('=')[0]}"):
        ComposedEncoder(visual, bank)


def test_non_vit_tower_raises():
    resnet = open_clip.model.ModifiedResNet(layers=(1, 1, 1, 1), output_dim=8, heads=2, image_size=32,
                                            width=8)
    pre = resnet.state_dict()
    bank = TaskVectorBank.from_state_dicts(pre, finetuned(pre, 1))
    with pytest.raises(TypeError, match="ModifiedResNet"):
        ComposedEncoder(resnet, bank)


def test_bank_tower_mismatch_names_the_key():
    visual = make_tower("gelu")
    pre = visual.state_dict()
    wide = VisionTransformer(**{**TOWERS["gelu"], "output_dim": 25}).state_dict()
    with pytest.raises(ValueError, match=r"shape mismatch for 'proj': bank \[32, 25\] vs tower \[32, 24\]"):
        ComposedEncoder(visual, TaskVectorBank.from_state_dicts(wide, finetuned(wide, 1)))
    fewer = {k: v for k, v in pre.items() if k != "ln_post.bias"}
    with pytest.raises(ValueError, match="no task vectors for tower key 'ln_post.bias'"):
        ComposedEncoder(visual, TaskVectorBank.from_state_dicts(fewer, finetuned(fewer, 1)))
    more = {**pre, "extra.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match="'extra.weight' that the tower lacks"):
        ComposedEncoder(visual, TaskVectorBank.from_state_dicts(more, finetuned(more, 1)))


def test_invalid_inputs_raise():
    visual, _, _, bank = setup("gelu", num_tasks=3)
    enc = ComposedEncoder(visual, bank)
    x, B = images_for(visual, 2), bank.num_blocks
    with pytest.raises(ValueError, match=rf"\[N, T, B\] = \[2, 3, {B}\].*got \[2, 4, {B}\]"):
        enc(x, torch.zeros(2, 4, B))
    with pytest.raises(ValueError, match=rf"got \[3, 3, {B}\]"):
        enc(x, torch.zeros(3, 3, B))
    with pytest.raises(ValueError, match=r"got \[3, 1\]"):
        enc(x, torch.zeros(3, 1))
    bad = torch.zeros(2, 3, B)
    bad[1, 2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"coef\[1, 2, 5\] = nan is not finite"):
        enc(x, bad)
    with pytest.raises(ValueError, match=r"coef\[0\] = inf is not finite"):
        enc(x, torch.tensor([float("inf"), 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"images must have shape \[N, 3, H, W\], got \[2, 1, 16, 16\]"):
        enc(x[:, :1], torch.zeros(3))
    with pytest.raises(ValueError, match="positional embedding expects 16"):
        enc(torch.zeros(2, 3, 20, 20), torch.zeros(3))
    with pytest.raises(ValueError, match="mode must be one of"):
        ComposedEncoder(visual, bank, mode="fast")


class CountMacs(TorchDispatchMode):
    """Multiply-adds of the matrix multiplies (mm, addmm, bmm; in-place included)."""

    def __init__(self):
        super().__init__()
        self.macs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_", "bmm"):
            a, b = args[:2] if name in ("mm", "bmm") else args[1:3]
            self.macs += a.numel() * b.shape[-1]
        return func(*args, **(kwargs or {}))


LINEAR = ("conv1.weight", "proj", "in_proj_weight", "out_proj.weight", "c_fc.weight", "c_proj.weight")


def scattered_coef(n: int, t: int, b: int, k: int, seed: int = 4) -> torch.Tensor:
    """Every sample keeps ``k`` task vectors per block, chosen independently per sample and block."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(n, t, b, generator=gen).argsort(dim=1) < k
    return torch.randn(n, t, b, generator=gen) * keep


def linear_macs(visual, n: int) -> int:
    with torch.no_grad(), CountMacs() as counter:
        ComposedEncoder(visual, TaskVectorBank.from_state_dicts(visual.state_dict(), finetuned(
            visual.state_dict(), 1)), mode="composed")(images_for(visual, n), torch.zeros(1))
    return counter.macs


@pytest.mark.parametrize("grad", ["none", "images", "sparse_grad"])
def test_sample_sparse_path_matches_oracle(grad):
    # scattered pattern: each sample keeps one task per block, a different one per sample; the per-sample
    # GEMMs gather only those samples, forward and gradients exact
    visual, pre, fts, bank = setup("gelu", num_tasks=4)
    x = images_for(visual, 6).requires_grad_(grad == "images")
    coef = scattered_coef(6, 4, bank.num_blocks, 1).requires_grad_(grad == "sparse_grad")
    enc = ComposedEncoder(visual, bank, mode="sparse", sparse_grad=True)
    with torch.set_grad_enabled(grad != "none"):
        out = enc(x, coef)
    ref, ref_grad = oracle_grad(visual, pre, fts, bank, x.detach(), coef, torch.ones_like(out))
    assert max_diff(out.detach(), ref) <= TOL * ref.abs().max().item()
    if grad == "sparse_grad":
        (g,) = torch.autograd.grad(out.sum(), coef)
        nonzero = coef != 0
        assert max_diff(g[nonzero], ref_grad[nonzero]) <= TOL * ref_grad.abs().max().item()
        assert (g[~nonzero] == 0).all()
    if grad == "images":
        (g,) = torch.autograd.grad(out.square().sum(), x)
        ref_x = x.detach().clone().requires_grad_(True)
        ref = oracle(visual, bank, ref_x, coef)
        (ref_g,) = torch.autograd.grad(ref.square().sum(), ref_x)
        assert max_diff(g, ref_g) <= 1e-4 * ref_g.abs().max().item()


def test_sample_sparse_cost_follows_each_samples_active_task_vectors():
    # k task vectors per sample and block, scattered: the composed path pays the union of the batch (all T
    # here), the sparse path k per sample: exactly (1 + k) plain forwards of linear-layer multiply-adds
    visual, _, _, bank = setup("gelu", num_tasks=4)
    plain = linear_macs(visual, 8)
    for k in (1, 2):
        # sample n keeps tasks n + b, ..., n + b + k - 1 (mod T) in block b: every task used in every block
        n, t, b = torch.meshgrid(torch.arange(8), torch.arange(4), torch.arange(bank.num_blocks),
                                 indexing="ij")
        coef = (0.3 + 0.1 * torch.randn(8, 4, bank.num_blocks)) * ((t - n - b) % 4 < k)
        assert ((coef != 0).any(dim=0)).all() and ((coef != 0).sum(dim=1) == k).all()
        macs = {}
        for mode in ("composed", "sparse"):
            with torch.no_grad(), CountMacs() as counter:
                ComposedEncoder(visual, bank, mode=mode)(images_for(visual, 8), coef)
            macs[mode] = counter.macs
        small = sum(8 * 4 * e.numel for e in bank.entries if not e.name.endswith(LINEAR))  # small tensors
        assert macs["composed"] == 5 * plain + small
        assert macs["sparse"] == (1 + k) * plain + small


def test_auto_gathers_when_the_cost_model_says_so():
    # wide layers (gathering is cheap beside the GEMM): auto takes the sparse path for a scattered pattern;
    # a task vector used by every sample runs over the whole batch without gathering
    visual = VisionTransformer(image_size=8, patch_size=4, width=256, layers=1, heads=4, mlp_ratio=1,
                               output_dim=256).eval()
    pre = visual.state_dict()
    bank = TaskVectorBank.from_state_dicts(pre, finetuned(pre, 4, scale=0.02))
    x = images_for(visual, 8)
    coef = scattered_coef(8, 4, bank.num_blocks, 1)
    coef[:, 0] = 0.5  # task 0 dense for every sample: no gather for it
    with torch.no_grad():
        with CountMacs() as auto:
            out = ComposedEncoder(visual, bank)(x, coef)
        with CountMacs() as sparse:
            ComposedEncoder(visual, bank, mode="sparse")(x, coef)
        with CountMacs() as composed:
            ComposedEncoder(visual, bank, mode="composed")(x, coef)
        ref = oracle(visual, bank, x, coef)
    # composed: 1 + 4 GEMMs per layer; sparse: 1 + 1 (task 0) + 1 (each sample's own task, gathered)
    assert auto.macs == sparse.macs < composed.macs - 1.9 * linear_macs(visual, 8)
    assert max_diff(out, ref) <= TOL * ref.abs().max().item()


def test_expanded_shared_coefficients_merge_once_under_autograd():
    # aTLAS passes λ [T, B] expanded to [N, T, B]: one differentiable merge per layer and a plain forward
    # (not 1 + T GEMMs per layer), the gradient the sum over samples, as the oracle's
    visual, pre, fts, bank = setup("quickgelu-layerscale", blocks="layer", num_tasks=3)
    x = images_for(visual, 5)
    lam = (0.3 * torch.randn(3, bank.num_blocks)).requires_grad_(True)
    with CountMacs() as shared:
        out = ComposedEncoder(visual, bank)(x, lam.expand(5, 3, bank.num_blocks))
    (grad,) = torch.autograd.grad(out.square().sum(), lam)
    with CountMacs() as per_sample:
        ComposedEncoder(visual, bank)(x, lam.expand(5, 3, bank.num_blocks).clone())
    plain = linear_macs(visual, 5)  # merges: T·P multiply-adds, 3 / 17 tokens of one plain forward
    assert shared.macs < 1.2 * plain and per_sample.macs > 3.9 * plain
    ref_lam = lam.detach().clone().requires_grad_(True)
    ref = functional_call(visual, hand_merge(pre, fts, bank, ref_lam), (x,))
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), ref_lam)
    assert max_diff(out.detach(), ref.detach()) <= TOL * ref.abs().max().item()
    assert max_diff(grad, ref_grad) <= 1e-5 * ref_grad.abs().max().item()


def bank_merge(bank: TaskVectorBank, coef_n: torch.Tensor) -> dict:
    """θ0 + Σ_t coef_n[t, b(k)] τ_t[k] from the bank's own (reconstructed) task vectors; differentiable."""
    out = bank.pretrained_state_dict()
    for k in bank.param_names:
        out[k] = out[k] + torch.einsum("t,t...->...", coef_n[:, bank.block_index(k)], bank.task_vector(k))
    return out


@pytest.mark.parametrize("mode", MODES)
def test_low_rank_bank_forward_and_gradients_match_oracle(mode):
    visual, _, _, full = setup("quickgelu-layerscale", num_tasks=3)
    bank = full.low_rank(rank=2)
    assert "transformer.resblocks.0.mlp.c_fc.weight" in bank.factors and "proj" in bank.factors
    x = images_for(visual, 4)
    coef = sparse_coef(4, 3, bank.num_blocks).requires_grad_(True)
    out = ComposedEncoder(visual, bank, mode=mode)(x, coef)
    (grad,) = torch.autograd.grad(out.square().sum(), coef)
    ref_coef = coef.detach().clone().requires_grad_(True)
    ref = torch.cat([functional_call(visual, bank_merge(bank, ref_coef[n]), (x[n:n + 1],)) for n in range(4)])
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), ref_coef)
    assert max_diff(out.detach(), ref.detach()) <= TOL * ref.abs().max().item()
    assert max_diff(grad, ref_grad) <= 1e-5 * ref_grad.abs().max().item()
    with torch.no_grad():  # the per-sample oracle of bank.merge, as for the exact bank
        assert max_diff(ComposedEncoder(visual, bank, mode=mode)(x, coef), oracle(visual, bank, x, coef)) \
            <= TOL * ref.abs().max().item()


def test_low_rank_forward_costs_two_thin_gemms_per_layer():
    # rank r factors: x -> (x Bᵀ) -> Aᵀ for all T task vectors at once, T·r·(in + out) multiply-adds per token
    visual, _, _, full = setup("gelu", num_tasks=4)
    bank = full.low_rank(rank=2)
    coef = 0.3 * torch.randn(8, 4, bank.num_blocks)
    with torch.no_grad(), CountMacs() as counter:
        ComposedEncoder(visual, bank)(images_for(visual, 8), coef)
    tokens = {"conv1.weight": 8 * 16, "proj": 8}
    linear = [k for k in bank.factors if k.endswith(LINEAR)]
    extra = sum(tokens.get(k, 8 * 17) * 4 * 2 * (bank.factors[k][0].shape[1] + bank.factors[k][1].shape[2])
                for k in linear)
    small = sum(8 * 4 * e.numel for e in bank.entries if not e.name.endswith(LINEAR))  # per-sample tensors
    assert len(linear) == 10 and "positional_embedding" in bank.factors
    assert counter.macs == linear_macs(visual, 8) + extra + small
