"""Gated sampling: the filter against hand-worked numbers, exact 0/1 gates with straight-through gradients,
``q(gate) = Bernoulli(p · F)`` for the guide's draws and for ``pyro.infer.Predictive``, and the evaluation
coefficients ``1[p_eff ≥ 0.5] · μ``."""

import pyro
import pytest
import torch
from planted import planted_problem
from pyro import poutine
from pyro.infer import Predictive
from torch.testing import assert_close

from vtvc_pyro.gating import ImportanceUncertaintyFilter
from vtvc_pyro.guide import AmortizedGuide
from vtvc_pyro.kl import GateBernoulli
from vtvc_pyro.model import Batch, VTVCModel

# Hand-worked with τ0 = 0.05, β = 1, ε = 1e-6 (ε is negligible at these magnitudes):
#   μ      σ      u = tanh(σ/|μ|)         τ = τ0 (1 + u)   F
#   0.3    0.05   tanh(0.16667) = 0.16514  0.058257        1
#   0.06   0.1    tanh(1.66667) = 0.93111  0.096555        0  (|μ| < τ: unreliable)
#  -0.2    0.01   tanh(0.05)    = 0.04996  0.052498        1  (sign does not matter)
#   0.04   0.0    tanh(0)       = 0        0.050000        0  (unimportant even when certain)
#   0.055  0.0    0                        0.050000        1
CASES = [(0.3, 0.05, 0.058257, 1.0), (0.06, 0.1, 0.096555, 0.0), (-0.2, 0.01, 0.052498, 1.0),
         (0.04, 0.0, 0.05, 0.0), (0.055, 0.0, 0.05, 1.0)]


def test_filter_matches_hand_worked_examples():
    rule = ImportanceUncertaintyFilter(tau0=0.05, beta=1.0, sharpness=20.0)
    loc, scale, tau, keep = (torch.tensor(column) for column in zip(*CASES, strict=True))
    assert_close(rule.threshold(loc, scale), tau, atol=1e-6, rtol=0)
    assert torch.equal(rule(torch.zeros(5), loc, scale), keep)
    # soft filter of the first case: sigmoid(20 (0.3 − 0.058257)) = 0.992115
    assert rule.soft(loc, scale)[0].item() == pytest.approx(0.992115, abs=1e-5)


def test_beta_zero_makes_the_threshold_constant():
    rule = ImportanceUncertaintyFilter(tau0=0.1, beta=0.0)
    loc, scale = torch.tensor([0.09, 0.11, -0.11]), torch.tensor([5.0, 5.0, 5.0])
    assert torch.equal(rule(torch.ones(3), loc, scale), torch.tensor([0.0, 1.0, 1.0]))


def test_filter_is_exactly_binary_with_the_soft_filter_gradient():
    rule = ImportanceUncertaintyFilter(tau0=0.1, beta=0.0, sharpness=20.0)
    loc = torch.linspace(-0.5, 0.5, 13).requires_grad_()
    keep = rule(torch.zeros(13), loc, torch.full((13,), 0.05))
    assert set(keep.tolist()) <= {0.0, 1.0}
    keep.sum().backward()
    # τ constant: d F̃ / d μ = k · sign(μ) · F̃ (1 − F̃),  F̃ = sigmoid(k (|μ| − τ0))
    soft = torch.sigmoid(20 * (loc.detach().abs() - 0.1))
    assert_close(loc.grad, 20 * loc.detach().sign() * soft * (1 - soft))


def test_filter_rejects_bad_settings():
    with pytest.raises(ValueError, match="gating.tau0: must be >= 0"):
        ImportanceUncertaintyFilter(tau0=-0.1)
    with pytest.raises(ValueError, match="gating.sharpness: must be > 0"):
        ImportanceUncertaintyFilter(sharpness=0.0)


def test_gate_draws_follow_the_effective_inclusion_probabilities():
    pyro.set_rng_seed(1)
    logits = torch.tensor([-2.0, -0.5, 0.0, 0.8, 2.5, 2.5])
    keep = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    q = GateBernoulli(logits, temperature=0.3, keep=keep)
    draws = q.rsample((20000,))
    p_eff = torch.sigmoid(logits) * keep
    assert_close(q.mean, p_eff)
    tolerance = 5 * (p_eff * (1 - p_eff) / 20000).sqrt() + 1e-9  # five binomial standard errors
    assert torch.all((draws.mean(0) - p_eff).abs() <= tolerance)
    assert torch.all(draws[:, -1] == 0), "a filtered component is never drawn"
    # log q is the Bernoulli(p_eff) mass of the draw
    value = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    expected = torch.where(value > 0, p_eff, 1 - p_eff).log()
    assert_close(q.log_prob(value), expected)
    assert q.log_prob(torch.ones(6))[-1] == float("-inf")


@pytest.fixture(scope="module")
def problem():
    return planted_problem(num_per_task=10)


def a_batch(problem):
    images = torch.stack([problem.data[i][1] for i in range(len(problem.data))])
    task = torch.tensor([problem.data[i][3] for i in range(len(problem.data))])
    features0 = torch.nn.functional.normalize(problem.encoder(images, torch.zeros(len(images), 3, 2)), dim=-1)
    return Batch(torch.arange(len(images)), images, features0, None, task, len(images))


def hand_inclusion(logits, loc, scale, tau0=0.05, beta=1.0):
    """``p_eff = sigmoid(ℓ) · 1[|μ| ≥ τ0 (1 + β tanh(σ / |μ|))]``."""
    tau = tau0 * (1 + beta * torch.tanh(scale / (loc.abs() + 1e-6)))
    return torch.sigmoid(logits) * (loc.abs() >= tau)


@pytest.mark.parametrize("gating", ["gated", "ungated"])
def test_guide_gates_are_exactly_zero_or_one(problem, gating):
    guide = AmortizedGuide(19, problem.task_names, problem.block_names, gating=gating, init_prob=0.5,
                           init_weight_scale=2.0)
    trace = poutine.trace(guide).get_trace(a_batch(problem))
    gate = trace.nodes["gate"]["value"]
    assert set(gate.unique().tolist()) == {0.0, 1.0}


def test_evaluation_coef_is_loc_where_the_effective_inclusion_is_at_least_half(problem):
    guide = AmortizedGuide(19, problem.task_names, problem.block_names, init_prob=0.5, init_loc=0.06,
                           init_weight_scale=3.0)
    features0 = a_batch(problem).features0
    logits, loc, scale = (t.detach() for t in guide.components(features0))
    p_eff = hand_inclusion(logits, loc, scale)
    assert_close(guide.inclusion(features0), p_eff)
    coef, gate = guide.point_coef(features0), guide.decision(features0)
    assert torch.equal(gate, (p_eff >= 0.5).float())
    filtered = p_eff == 0
    assert 0 < gate.mean() < 1 and filtered.any() and (~filtered & (gate == 0)).any(), \
        "the example should have components on, filtered, and off by their inclusion probability"
    assert torch.all(coef[gate == 0] == 0)
    assert torch.equal(coef[gate == 1], loc[gate == 1])


def test_a_pluggable_filter_decides_which_components_can_be_drawn(problem):
    def by_loc_only(logits, loc, scale):
        return (loc > 0.3).to(loc.dtype)

    guide = AmortizedGuide(19, problem.task_names, problem.block_names, gate_filter=by_loc_only,
                           init_prob=0.9, init_weight_scale=3.0)
    features0 = a_batch(problem).features0
    logits, loc, _ = (t.detach() for t in guide.components(features0))
    expected = torch.sigmoid(logits) * (loc > 0.3)
    assert_close(guide.inclusion(features0), expected)
    assert torch.equal(guide.decision(features0), (expected >= 0.5).float())
    for _ in range(5):
        gate = poutine.trace(guide).get_trace(a_batch(problem)).nodes["gate"]["value"]
        assert torch.all(gate[loc <= 0.3] == 0)


@pytest.mark.parametrize("gating", ["gated", "ungated"])
def test_predictive_draws_gates_at_the_effective_inclusion_and_slabs_from_the_guide(problem, gating):
    """``pyro.infer.Predictive(model, guide=guide)`` draws ``gate ~ Bernoulli(p_eff)``, ``slab ~ N(μ, σ)``."""
    model = VTVCModel(problem.encoder, problem.heads, None, problem.task_names, problem.block_names)
    guide = AmortizedGuide(19, problem.task_names, problem.block_names, gating=gating, init_prob=0.6,
                           init_loc=0.07, init_scale=0.05, init_weight_scale=3.0)
    batch = a_batch(problem)
    logits, loc, scale = (t.detach() for t in guide.components(batch.features0))
    p_eff = hand_inclusion(logits, loc, scale) if gating == "gated" else torch.sigmoid(logits)
    assert (p_eff == 0).any() == (gating == "gated")
    num = 300
    draws = Predictive(model, guide=guide, num_samples=num, return_sites=["gate", "slab", "coef"])(batch)
    gate, slab = draws["gate"], draws["slab"]
    assert gate.shape == (num, 30, 3, 2)
    z = (gate.mean(0) - p_eff) / (p_eff * (1 - p_eff) / num).sqrt().clamp_min(1e-9)
    assert z.abs().max() < 5 and abs(z.mean().item()) < 0.3
    assert torch.all(gate.mean(0)[p_eff == 0] == 0)
    assert torch.all((slab.mean(0) - loc).abs() < 5 * scale / num**0.5)
    assert torch.all((slab.std(0) / scale - 1).abs() < 0.25)
    assert_close(draws["coef"], gate * slab)
