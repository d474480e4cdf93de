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
MODES = ("composed", "materialise", "auto")


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
    assert ref.abs().max() > 0.5  # a meaningful output scale for the absolute tolerance
    assert max_diff(out, ref) <= TOL


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


def test_sparse_grad_skips_zero_components_under_autograd():
    visual, pre, fts, bank = setup("quickgelu-layerscale", blocks="tensor", num_tasks=3)
    x = images_for(visual, 4)
    target = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    coef = sparse_coef(4, 3, bank.num_blocks).requires_grad_(True)
    with CountGemms() as sparse_count:
        out = ComposedEncoder(visual, bank, sparse_grad=True)(x, coef)
    with CountGemms() as dense_count:
        ComposedEncoder(visual, bank)(x, coef)
    assert sum(sparse_count.count.values()) < sum(dense_count.count.values())
    (grad,) = torch.autograd.grad((out * target).sum(), coef)
    ref, ref_grad = oracle_grad(visual, pre, fts, bank, x, coef, target)
    skipped = (coef == 0).all(dim=0)
    assert max_diff(out.detach(), ref) <= TOL
    assert (grad[:, skipped] == 0).all()
    assert max_diff(grad[:, ~skipped], ref_grad[:, ~skipped]) <= TOL


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
    ref = torch.cat([functional_call(visual, bank.merge(coef[n]), (ref_x[n:n + 1],)) for n in range(3)])
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
