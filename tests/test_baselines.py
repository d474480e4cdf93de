"""Deterministic baselines through the SVI engine: the ELBO with the empty guide is exactly the data-scaled
cross-entropy, only the baseline's own parameters are trained, and a fit improves the fit-set accuracy."""

import pyro
import pytest
import torch
import torch.nn.functional as F
from planted import planted_problem
from pyro.infer import Trace_ELBO
from torch.testing import assert_close

from vtvc_pyro.baselines import ATLASModel, MetaNetModel, empty_guide
from vtvc_pyro.inference import SVIConfig, fit_svi
from vtvc_pyro.model import Batch, collate_items


@pytest.fixture(scope="module")
def problem():
    return planted_problem(num_per_task=40)


def cross_entropy_sum(problem, images, labels, task, coef):
    """Σ_n −log softmax(head_task(n)(f(x_n; coef_n)))[y_n], head by head."""
    features = problem.encoder(images, coef)
    total = torch.zeros(())
    for n in range(len(labels)):
        head = problem.heads[problem.task_names[task[n]]]
        total = total - torch.log_softmax(head(features[n:n + 1])[0], -1)[labels[n]]
    return total


def accuracy(problem, baseline):
    images, labels, task = collate_items(problem.data, torch.arange(len(problem.data)))
    coef = baseline.point_coef(F.normalize(images @ problem.encoder.base, dim=-1))
    predicted = problem.heads.logits(problem.encoder(images, coef), task).argmax(-1)
    return (predicted == labels).float().mean().item()


def batch_of(problem, positions):
    images, labels, task = collate_items(problem.data, positions)
    features0 = F.normalize(images @ problem.encoder.base, dim=-1)
    return Batch(positions, images, features0, labels, task, len(problem.data))


def make(problem, kind):
    if kind == "atlas":
        return ATLASModel(problem.encoder, problem.heads, problem.task_names, problem.block_names)
    return MetaNetModel(problem.encoder, problem.heads, 19, problem.task_names, problem.block_names,
                        hidden_dim=16)


@pytest.mark.parametrize("kind", ["atlas", "metanet"])
def test_the_elbo_with_the_empty_guide_is_the_scaled_cross_entropy(problem, kind):
    baseline = make(problem, kind)
    positions = torch.tensor([0, 7, 45, 46, 100, 119])
    batch = batch_of(problem, positions)
    loss = Trace_ELBO().differentiable_loss(baseline, empty_guide, batch)
    coef = baseline.point_coef(batch.features0)
    cross_entropy = cross_entropy_sum(problem, batch.images, batch.labels, batch.task, coef)
    assert_close(loss, len(problem.data) / 6 * cross_entropy)


def test_atlas_starts_at_zero_or_a_given_init(problem):
    atlas = make(problem, "atlas")
    assert torch.equal(atlas.point_coef(torch.zeros(4, 19)), torch.zeros(4, 3, 2))
    init = torch.arange(6.0).view(3, 2)
    given = ATLASModel(problem.encoder, problem.heads, problem.task_names, problem.block_names, init=init)
    assert torch.equal(given.point_coef(torch.zeros(2, 19)), init.expand(2, 3, 2))
    with pytest.raises(ValueError, match=r"init must be a number or \[T, B\] = \[3, 2\], got shape \[2, 3\]"):
        ATLASModel(problem.encoder, problem.heads, problem.task_names, problem.block_names,
                   init=torch.ones(2, 3))


def test_metanet_starts_near_the_task_arithmetic_coefficient(problem):
    meta = make(problem, "metanet")
    coef = meta.point_coef(batch_of(problem, torch.arange(20)).features0)
    assert_close(coef, torch.full_like(coef, 0.3), atol=0.02, rtol=0)


@pytest.mark.parametrize(("kind", "params", "gain"), [
    ("atlas", {"coefficients"}, 0.1),  # one composition for all tasks: limited on this problem
    ("metanet", {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}, 0.4),
])
def test_a_fit_trains_only_the_baseline_and_improves_accuracy(problem, kind, params, gain):
    baseline = make(problem, kind)
    start = accuracy(problem, baseline)
    stored = []
    fit_svi(baseline, empty_guide, problem.data, SVIConfig(steps=150, batch_size=40, lr=0.05, progress=False),
            callback=lambda info: stored.append(set(pyro.get_param_store().keys())))
    assert stored[-1] == params
    print(f"{kind}: fit-set accuracy {start:.3f} -> {accuracy(problem, baseline):.3f}")
    assert accuracy(problem, baseline) > start + gain


def test_atlas_trains_through_one_merge_of_the_composed_encoder():
    # aTLAS hands the composed encoder λ expanded to [n, T, B] (stride 0 along n): the encoder merges once
    # per layer and runs a plain forward; the ELBO gradient in λ equals the hand-merged model's
    from open_clip.transformer import VisionTransformer
    from torch.func import functional_call

    from vtvc_pyro import ComposedEncoder, TaskVectorBank
    from vtvc_pyro.heads import ClassificationHead, HeadBank

    torch.manual_seed(0)
    visual = VisionTransformer(image_size=16, patch_size=4, width=32, layers=2, heads=4, mlp_ratio=2,
                               output_dim=24).eval()
    pre = visual.state_dict()
    fts = {f"t{t}": {k: v + 0.05 * torch.randn(v.shape) for k, v in pre.items()} for t in range(3)}
    bank = TaskVectorBank.from_state_dicts(pre, fts, blocks="layer")
    encoder = ComposedEncoder(visual, bank)
    seen = []

    def spy(images, coef):
        seen.append(coef.stride(0))
        return encoder(images, coef)

    heads = HeadBank({"a": ClassificationHead(torch.randn(3, 24), 10.0, list("xyz")),
                      "b": ClassificationHead(torch.randn(2, 24), 10.0, list("uv"))})
    init = 0.3 * torch.randn(3, bank.num_blocks)
    atlas = ATLASModel(spy, heads, bank.task_names, bank.block_names, init=init)
    images, labels = torch.randn(6, 3, 16, 16), torch.tensor([0, 2, 1, 1, 0, 1])
    task = torch.tensor([0, 0, 0, 1, 1, 1])
    batch = Batch(torch.arange(6), images, torch.zeros(6, 24), labels, task, 60)
    loss = Trace_ELBO().differentiable_loss(atlas, empty_guide, batch)
    (grad,) = torch.autograd.grad(loss, atlas.coefficients)
    assert seen == [0]
    lam = init.clone().requires_grad_(True)
    merged = {k: v + sum(lam[t, bank.block_index(k)] * (ft[k] - v) for t, ft in enumerate(fts.values()))
              for k, v in pre.items()}
    logits = heads.logits(functional_call(visual, merged, (images,)), task)
    ref = 10 * F.cross_entropy(logits, labels, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, lam)
    assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    assert_close(grad, ref_grad, rtol=1e-4, atol=1e-4 * ref_grad.abs().max().item())
