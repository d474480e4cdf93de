"""Gated sampling: the rule against hand-worked numbers, exact 0/1 gates with straight-through gradients,
evaluation coefficients, and the stochastic ablation's gates following the inclusion probabilities."""

import math

import pyro
import pytest
import torch
from planted import planted_problem
from pyro import poutine
from torch.testing import assert_close

from vtvc_pyro.gating import ImportanceUncertaintyGate
from vtvc_pyro.guide import AmortizedGuide
from vtvc_pyro.kl import GateBernoulli
from vtvc_pyro.model import Batch

# Hand-worked with τ0 = 0.05, β = 1, ε = 1e-6 (ε is negligible at these magnitudes):
#   ℓ     μ      σ      p = sigmoid(ℓ)   u = tanh(σ/|μ|)         τ = τ0 (1 + u)   G
#   1.0   0.3    0.05   0.7311           tanh(0.16667) = 0.16514  0.058257        1  (p ≥ .5, |μ| ≥ τ)
#  -0.5   0.3    0.05   0.3775           0.16514                  0.058257        0  (p < .5)
#   2.0   0.06   0.1    0.8808           tanh(1.66667) = 0.93111  0.096555        0  (|μ| < τ)
#   2.0  -0.2    0.01   0.8808           tanh(0.05)    = 0.04996  0.052498        1  (sign does not matter)
#   0.0   0.5    0.5    0.5              tanh(1)       = 0.76159  0.088080        1  (p = .5 is kept)
#   3.0   0.055  0.0    0.9526           tanh(0)       = 0        0.050000        1  (no uncertainty: τ = τ0)
CASES = [(1.0, 0.3, 0.05, 0.058257, 1.0), (-0.5, 0.3, 0.05, 0.058257, 0.0), (2.0, 0.06, 0.1, 0.096555, 0.0),
         (2.0, -0.2, 0.01, 0.052498, 1.0), (0.0, 0.5, 0.5, 0.088080, 1.0), (3.0, 0.055, 0.0, 0.05, 1.0)]


def test_gating_rule_matches_hand_worked_examples():
    rule = ImportanceUncertaintyGate(tau0=0.05, beta=1.0, sharpness=20.0)
    logits, loc, scale, tau, gate = (torch.tensor(column) for column in zip(*CASES, strict=True))
    assert_close(rule.threshold(loc, scale), tau, atol=1e-6, rtol=0)
    assert torch.equal(rule(logits, loc, scale), gate)
    # soft gate of the first case: sigmoid(1) · sigmoid(20 (0.3 − 0.058257)) = 0.731059 · 0.992115
    assert rule.soft(logits, loc, scale)[0].item() == pytest.approx(0.731059 * 0.992115, abs=1e-5)


def test_beta_zero_makes_the_threshold_constant():
    rule = ImportanceUncertaintyGate(tau0=0.1, beta=0.0)
    loc, scale = torch.tensor([0.09, 0.11, -0.11]), torch.tensor([5.0, 5.0, 5.0])
    assert torch.equal(rule(torch.ones(3), loc, scale), torch.tensor([0.0, 1.0, 1.0]))


def test_gate_is_exactly_binary_with_the_soft_gate_gradient():
    rule = ImportanceUncertaintyGate()
    logits = torch.linspace(-3, 3, 13, requires_grad=True)
    loc = torch.linspace(-0.5, 0.5, 13).requires_grad_()
    scale = torch.full((13,), 0.05)
    gate = rule(logits, loc, scale)
    assert set(gate.tolist()) <= {0.0, 1.0}
    gate.sum().backward()
    # d G̃ / d ℓ = p (1 − p) · sigmoid(k (|μ| − τ))
    p = torch.sigmoid(logits.detach())
    expected = p * (1 - p) * torch.sigmoid(20 * (loc.detach().abs() - rule.threshold(loc.detach(), scale)))
    assert_close(logits.grad, expected)


@pytest.fixture(scope="module")
def problem():
    return planted_problem(num_per_task=10)


def a_batch(problem, guide_input_dim=19):
    images = torch.stack([problem.data[i][1] for i in range(len(problem.data))])
    task = torch.tensor([problem.data[i][3] for i in range(len(problem.data))])
    features0 = torch.nn.functional.normalize(problem.encoder(images, torch.zeros(len(images), 3, 2)), dim=-1)
    return Batch(torch.arange(len(images)), images, features0, None, task, len(images))


@pytest.mark.parametrize("gating", ["gated", "stochastic"])
def test_guide_gates_are_exactly_zero_or_one(problem, gating):
    guide = AmortizedGuide(19, problem.task_names, problem.block_names, gating=gating, init_prob=0.5,
                           init_weight_scale=2.0)
    trace = poutine.trace(guide).get_trace(a_batch(problem))
    gate = trace.nodes["gate"]["value"]
    assert set(gate.unique().tolist()) == {0.0, 1.0}


def test_evaluation_coef_is_zero_when_gated_off_and_loc_when_on(problem):
    guide = AmortizedGuide(19, problem.task_names, problem.block_names, init_prob=0.5, init_loc=0.06,
                           init_weight_scale=3.0)
    features0 = a_batch(problem).features0
    logits, loc, scale = (t.detach() for t in guide.components(features0))
    coef, gate = guide.point_coef(features0), guide.decision(features0)
    tau = 0.05 * (1 + torch.tanh(scale / (loc.abs() + 1e-6)))
    expected_gate = (torch.sigmoid(logits) >= 0.5) & (loc.abs() >= tau)
    assert torch.equal(gate, expected_gate.float())
    assert 0 < gate.mean() < 1, "the example should have both decisions"
    assert torch.all(coef[gate == 0] == 0)
    assert torch.equal(coef[gate == 1], loc[gate == 1])


def test_a_pluggable_rule_decides_the_gates(problem):
    def by_loc_only(logits, loc, scale):
        return (loc > 0.3).to(loc.dtype)

    guide = AmortizedGuide(19, problem.task_names, problem.block_names, rule=by_loc_only,
                           init_weight_scale=3.0)
    features0 = a_batch(problem).features0
    loc = guide.components(features0)[1].detach()
    assert torch.equal(guide.decision(features0), (loc > 0.3).float())
    trace = poutine.trace(guide).get_trace(a_batch(problem))
    assert torch.equal(trace.nodes["gate"]["value"], (loc > 0.3).float())


def test_stochastic_gate_draws_follow_the_inclusion_probabilities():
    pyro.set_rng_seed(1)
    logits = torch.tensor([-2.0, -0.5, 0.0, 0.8, 2.5])
    draws = GateBernoulli(logits, temperature=0.3).rsample((20000,))
    p = torch.sigmoid(logits)
    tolerance = 5 * (p * (1 - p) / 20000).sqrt()  # five binomial standard errors
    assert torch.all((draws.mean(0) - p).abs() < tolerance)
    assert set(draws.unique().tolist()) == {0.0, 1.0}


def test_stochastic_guide_gates_follow_their_own_inclusion_probabilities(problem):
    guide = AmortizedGuide(19, problem.task_names, problem.block_names, gating="stochastic", init_prob=0.4,
                           init_weight_scale=3.0)
    batch = a_batch(problem)
    p = torch.sigmoid(guide.components(batch.features0)[0].detach())
    draws = torch.stack([poutine.trace(guide).get_trace(batch).nodes["gate"]["value"] for _ in range(400)])
    z = (draws.mean(0) - p) / (p * (1 - p) / 400).sqrt()
    assert z.abs().max() < 5 and math.isclose(z.mean().item(), 0.0, abs_tol=0.3)
