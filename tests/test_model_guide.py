"""Model and guide: site structure, the registered analytic KLs against closed forms, the KL's gradient,
mini-batch scaling, KL annealing, and which parameters reach Pyro's param store."""

import math

import pyro
import pytest
import torch
from planted import planted_problem
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.util import is_validation_enabled
from torch import nn
from torch.distributions import kl_divergence
from torch.testing import assert_close

from vtvc_pyro.gating import ImportanceUncertaintyFilter
from vtvc_pyro.guide import AmortizedGuide, TaskLevelGuide
from vtvc_pyro.kl import GateBernoulli, SlabNormal
from vtvc_pyro.model import Batch, VTVCModel

PRIORS = {
    "spike_and_slab": {"kind": "spike_and_slab", "pi": 0.5, "slab": {"loc": 0.0, "scale": 1.0}},
    "gaussian": {"kind": "gaussian"},
    "hierarchical": {"kind": "spike_and_slab", "pi_prior": {"a": 2.0, "b": 2.0}},
    "relaxed": {"kind": "spike_and_slab", "temperature": 0.5},
}
EXPECTED_LATENTS = {"spike_and_slab": ["gate", "slab"], "gaussian": ["slab"],
                    "hierarchical": ["pi", "gate", "slab"], "relaxed": ["gate", "slab"]}


@pytest.fixture(scope="module")
def problem():
    return planted_problem(num_per_task=8)


def make(problem, prior="spike_and_slab", gating="gated", guide_cls=AmortizedGuide, **kwargs):
    prior = PRIORS[prior]
    model = VTVCModel(problem.encoder, problem.heads, prior, problem.task_names, problem.block_names)
    if guide_cls is AmortizedGuide:
        guide = AmortizedGuide(problem.encoder.base.shape[1], problem.task_names, problem.block_names, prior,
                               gating=gating, **kwargs)
    else:
        guide = TaskLevelGuide(problem.task_names, problem.block_names, prior, gating=gating, **kwargs)
    return model, guide


def batch_of(problem, model, positions):
    images = torch.stack([problem.data[i][1] for i in positions])
    labels = torch.tensor([problem.data[i][2] for i in positions])
    task = torch.tensor([problem.data[i][3] for i in positions])
    features0 = model.frozen.features0(images)
    return Batch(torch.tensor(positions), images, features0, labels, task, len(problem.data))


def latent_sites(trace):
    plates = ("data", "tasks", "blocks")
    return [(name, tuple(site["value"].shape)) for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and name not in plates]


@pytest.mark.parametrize("prior", list(PRIORS))
@pytest.mark.parametrize("guide_cls", [AmortizedGuide, TaskLevelGuide])
def test_model_and_guide_have_the_same_latent_sites_in_the_same_order(problem, prior, guide_cls):
    gating = "ungated" if prior == "relaxed" else "gated"
    model, guide = make(problem, prior, gating, guide_cls)
    batch = batch_of(problem, model, [0, 3, 9, 17, 20])
    guide_trace = poutine.trace(guide).get_trace(batch)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
    shape = (5, 3, 2)
    expected = [(name, (3, 2) if name == "pi" else shape) for name in EXPECTED_LATENTS[prior]]
    assert latent_sites(guide_trace) == expected
    assert latent_sites(model_trace) == expected
    model_sites = [n for n, s in model_trace.nodes.items() if s["type"] == "sample" and n not in
                   ("data", "tasks", "blocks")]
    assert model_sites == [name for name, _ in expected] + ["coef", "obs"]
    slab = model_trace.nodes["slab"]["value"]
    gate = model_trace.nodes["gate"]["value"] if "gate" in model_trace.nodes else torch.ones_like(slab)
    assert_close(model_trace.nodes["coef"]["value"], gate * slab)
    assert model_trace.nodes["obs"]["value"].shape == (5, 1, 1)


def test_obs_uses_each_samples_own_head(problem):
    model, guide = make(problem)
    batch = batch_of(problem, model, [0, 9, 17])  # one sample of each task
    coef = torch.rand(3, 3, 2)
    conditioned = poutine.condition(model, data={"gate": torch.ones(3, 3, 2), "slab": coef})
    trace = poutine.trace(conditioned).get_trace(batch)
    features = problem.encoder(batch.images, coef)
    for n, task in enumerate(batch.task.tolist()):
        head = problem.heads[problem.task_names[task]]
        expected = torch.log_softmax(head(features[n:n + 1])[0], -1)
        logits = trace.nodes["obs"]["fn"].logits[n, 0, 0]
        assert_close(logits[: head.num_classes], expected)


def test_gate_kl_matches_the_bernoulli_closed_form():
    logits = torch.tensor([-3.0, -0.4, 0.0, 1.2, 4.0])
    pi = torch.tensor([0.5, 0.2, 0.9, 0.5, 0.01])
    p = torch.sigmoid(logits)
    # KL(Bern(p) ‖ Bern(π)) = p log(p/π) + (1 − p) log((1 − p)/(1 − π))
    expected = p * (p / pi).log() + (1 - p) * ((1 - p) / (1 - pi)).log()
    kl = kl_divergence(GateBernoulli(logits), torch.distributions.Bernoulli(probs=pi))
    assert_close(kl, expected)
    # filtered (keep = 0): q is a point mass at 0, KL(δ0 ‖ Bern(π)) = −log(1 − π)
    kl = kl_divergence(GateBernoulli(logits, keep=torch.zeros(5)), torch.distributions.Bernoulli(probs=pi))
    assert_close(kl, -(1 - pi).log())


def test_kl_with_the_filter_on_matches_a_hand_computation_in_value_and_gradient():
    """KL per component = F · [KL(Bern(p) ‖ Bern(π)) + p · KL(N(μ, σ) ‖ N(m, s))] + (1 − F) · (−log(1 − π)),
    with ``F`` the filter (forward 0/1) whose gradient is that of ``F̃ = sigmoid(k (|μ| − τ))``."""
    torch.set_default_dtype(torch.float64)
    rule = ImportanceUncertaintyFilter(tau0=0.05, beta=1.0, sharpness=20.0)
    logits = torch.tensor([0.8, -0.3, 1.5, 2.0, -1.0], requires_grad=True)
    loc = torch.tensor([0.3, -0.12, 0.07, 0.06, 0.5], requires_grad=True)
    scale = torch.tensor([0.05, 0.02, 0.04, 0.2, 0.3], requires_grad=True)
    pi, m, s = torch.tensor([0.5, 0.3, 0.5, 0.7, 0.5]), torch.tensor([0.0, 0.1, 0.0, 0.0, 0.2]), 1.5
    keep = rule(logits, loc, scale)
    gate_q = GateBernoulli(logits, keep=keep)
    slab_q = SlabNormal(loc, scale, gate_q.mean, torch.ones(5), m, torch.full((5,), s))
    kl = kl_divergence(gate_q, torch.distributions.Bernoulli(probs=pi)) + kl_divergence(
        slab_q, torch.distributions.Normal(m, torch.full((5,), s)))
    kl.sum().backward()

    ell, mu, sigma = logits.detach(), loc.detach(), scale.detach()
    p = torch.sigmoid(ell)
    r = sigma / (mu.abs() + 1e-6)
    tau = 0.05 * (1 + torch.tanh(r))
    hard = (mu.abs() >= tau).double()
    assert hard.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0], "the example should have filtered components"
    kl_bern = p * (p / pi).log() + (1 - p) * ((1 - p) / (1 - pi)).log()
    kl_norm = (s / sigma).log() + (sigma**2 + (mu - m) ** 2) / (2 * s**2) - 0.5
    kl_on, kl_off = kl_bern + p * kl_norm, -(1 - pi).log()
    assert_close(kl.detach(), hard * kl_on + (1 - hard) * kl_off)
    # gradients: the filter's surrogate F̃ = sigmoid(20 (|μ| − τ)), τ = 0.05 (1 + tanh(σ / |μ|))
    soft = torch.sigmoid(20 * (mu.abs() - tau))
    dtau_dr = 0.05 * (1 - torch.tanh(r) ** 2)
    dsoft_dmu = 20 * soft * (1 - soft) * (mu.sign() + dtau_dr * r / (mu.abs() + 1e-6) * mu.sign())
    dsoft_dsigma = -20 * soft * (1 - soft) * dtau_dr / (mu.abs() + 1e-6)
    dkl_dp = (p / (1 - p)).log() - (pi / (1 - pi)).log() + kl_norm
    assert_close(logits.grad, hard * dkl_dp * p * (1 - p))
    assert_close(loc.grad, hard * p * (mu - m) / s**2 + (kl_on - kl_off) * dsoft_dmu)
    assert_close(scale.grad, hard * p * (-1 / sigma + sigma / s**2) + (kl_on - kl_off) * dsoft_dsigma)


def test_slab_kl_is_the_inclusion_weighted_normal_closed_form():
    mu, sigma = torch.tensor([0.3, -1.0, 2.0]), torch.tensor([0.05, 0.5, 1.5])
    m, s = torch.tensor([0.0, 0.5, -1.0]), torch.tensor([1.0, 2.0, 0.3])
    p = torch.tensor([0.7, 0.1, 1.0])
    # p · KL(N(μ, σ) ‖ N(m, s)) = p · [log(s/σ) + (σ² + (μ − m)²) / (2 s²) − ½]
    expected = p * ((s / sigma).log() + (sigma**2 + (mu - m) ** 2) / (2 * s**2) - 0.5)
    q = SlabNormal(mu, sigma, p, torch.ones(3), m, s)
    assert_close(kl_divergence(q, torch.distributions.Normal(m, s)), expected)


def test_slab_log_prob_is_the_conditional_density_given_the_gate():
    mu, sigma, m, s = torch.tensor(0.3), torch.tensor(0.2), torch.tensor(0.0), torch.tensor(1.0)
    x = torch.tensor([0.1, 0.7])
    gate = torch.tensor([1.0, 0.0])
    q = SlabNormal(mu.expand(2), sigma.expand(2), torch.full((2,), 0.6), gate, m.expand(2), s.expand(2))

    def normal_log_pdf(v, loc, scale):
        return -0.5 * math.log(2 * math.pi * scale**2) - (v - loc) ** 2 / (2 * scale**2)

    expected = torch.tensor([normal_log_pdf(0.1, 0.3, 0.2), normal_log_pdf(0.7, 0.0, 1.0)])
    assert_close(q.log_prob(x), expected)


@pytest.mark.parametrize("gating", ["gated", "ungated"])
def test_meanfield_elbo_is_the_scaled_analytic_kl_and_its_gradient_reaches_the_guide(problem, gating):
    model, guide = make(problem, gating=gating, init_loc=0.07, init_weight_scale=2.0)
    batch = batch_of(problem, model, [1, 2, 11, 20])
    kl_only = poutine.block(model, hide=["obs"])
    loss = TraceMeanField_ELBO().differentiable_loss(kl_only, guide, batch)
    logits, loc, scale = guide.components(batch.features0)
    p = torch.sigmoid(logits)
    tau = 0.05 * (1 + torch.tanh(scale / (loc.abs() + 1e-6)))
    keep = (loc.abs() >= tau).float() if gating == "gated" else torch.ones_like(loc)
    assert 0 < keep.mean() <= 1 and (gating == "ungated" or keep.mean() < 1)
    kl_gate = p * (p / 0.5).log() + (1 - p) * ((1 - p) / 0.5).log()
    kl_slab = p * ((1 / scale).log() + (scale**2 + loc**2) / 2 - 0.5)
    per_component = keep * (kl_gate + kl_slab) + (1 - keep) * math.log(2)
    expected = len(problem.data) / 4 * per_component.sum()  # N / n scaling of the data plate
    assert_close(loss, expected)
    loss.backward()
    for name, param in guide.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no KL gradient reaches {name}"


@pytest.mark.parametrize("gating", ["gated", "ungated"])
def test_monte_carlo_kl_estimates_the_analytic_kl(problem, gating):
    """``Trace_ELBO``'s ``log q − log p`` (gate and slab, filter on) averages to the registered KL."""
    model, guide = make(problem, gating=gating, init_loc=0.07, init_prob=0.6, init_weight_scale=2.0)
    batch = batch_of(problem, model, [1, 2, 11, 20])
    kl_only = poutine.block(model, hide=["obs"])
    with torch.no_grad():
        analytic = TraceMeanField_ELBO().loss(kl_only, guide, batch)
        estimates = torch.tensor([Trace_ELBO().loss(kl_only, guide, batch) for _ in range(400)])
    assert abs(estimates.mean().item() - analytic) < 5 * estimates.std().item() / 400**0.5


def test_subsampling_and_kl_annealing_scale_the_right_sites(problem):
    model, guide = make(problem)
    batch = batch_of(problem, model, [4, 5, 6])
    guide_trace = poutine.trace(guide).get_trace(batch, kl_scale=0.25)
    trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch, kl_scale=0.25)
    full = len(problem.data) / 3
    assert trace.nodes["obs"]["scale"] == pytest.approx(full)
    for name in ("gate", "slab"):
        assert trace.nodes[name]["scale"] == pytest.approx(0.25 * full)
        assert guide_trace.nodes[name]["scale"] == pytest.approx(0.25 * full)


@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO])
@pytest.mark.parametrize(("prior", "gating"), [("spike_and_slab", "gated"), ("spike_and_slab", "ungated"),
                                               ("gaussian", "gated"), ("hierarchical", "gated"),
                                               ("relaxed", "ungated")])
def test_one_svi_step_runs_cleanly_and_only_guide_parameters_are_stored(problem, elbo, prior, gating):
    assert is_validation_enabled()
    model, guide = make(problem, prior, gating)
    batch = batch_of(problem, model, list(range(0, 24, 3)))
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 0.01}), elbo())
    before = {n: p.detach().clone() for n, p in guide.named_parameters()}
    loss = svi.step(batch)
    assert math.isfinite(loss)
    stored = set(pyro.get_param_store().keys())
    expected = {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    assert stored == (expected | {"pi_alpha", "pi_beta"} if prior == "hierarchical" else expected)
    assert any(not torch.equal(before[n], p) for n, p in guide.named_parameters())


def test_a_frozen_encoder_with_parameters_never_reaches_the_param_store(problem):
    class ModuleEncoder(nn.Module):  # an nn.Module encoder whose weights require grad
        def __init__(self):
            super().__init__()
            self.base = nn.Parameter(problem.encoder.base.clone())

        def forward(self, x, coef):
            return x @ self.base + torch.einsum("ni,ntb,tbid->nd", x, coef, problem.encoder.deltas)

    encoder = ModuleEncoder()
    model = VTVCModel(encoder, problem.heads, None, problem.task_names, problem.block_names)
    guide = AmortizedGuide(19, problem.task_names, problem.block_names)
    assert list(model.parameters()) == []
    batch = batch_of(problem, model, [0, 1, 2, 3])
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 0.01}), TraceMeanField_ELBO())
    svi.step(batch)
    assert set(pyro.get_param_store().keys()) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    assert_close(encoder.base.detach(), problem.encoder.base)


def test_amortized_guide_starts_at_the_method_initialisation(problem):
    model, guide = make(problem)
    batch = batch_of(problem, model, list(range(24)))
    logits, loc, scale = guide.components(batch.features0)
    assert_close(torch.sigmoid(logits), torch.full_like(logits, 0.7), atol=0.02, rtol=0)
    assert_close(loc, torch.full_like(loc, 0.3), atol=0.02, rtol=0)
    assert_close(scale, torch.full_like(scale, 0.05), atol=0.005, rtol=0)
    assert loc.std(0).max() > 0, "the amortized guide should depend on its input from the start"


def test_task_level_guide_shares_its_parameters_across_samples(problem):
    model, guide = make(problem, guide_cls=TaskLevelGuide, init_loc=0.4, init_prob=0.6)
    logits, loc, scale = guide.components(torch.randn(5, 19))
    assert loc.shape == (5, 3, 2)
    assert_close(loc, torch.full((5, 3, 2), 0.4))
    assert_close(torch.sigmoid(logits), torch.full((5, 3, 2), 0.6))
    assert {n for n, _ in guide.named_parameters()} == {"gate_logits", "slab_loc", "slab_rho"}


def test_guide_errors_name_the_bad_argument(problem):
    with pytest.raises(ValueError, match="gating: 'always' is not a gating mode; allowed: gated, ungated"):
        make(problem, gating="always")
    with pytest.raises(ValueError, match="gating: a relaxed spike needs gating='ungated'"):
        make(problem, "relaxed", "gated")
    with pytest.raises(ValueError, match="init_prob: must be in"):
        make(problem, init_prob=1.0)
    _, guide = make(problem)
    with pytest.raises(ValueError, match=r"features0 must be \[n, 19\], got shape \(4, 7\)"):
        guide.components(torch.zeros(4, 7))
