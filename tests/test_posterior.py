"""Posterior read-outs: per-sample summaries, per-(task, block) tables, per-task mean coefficients, the
gated and Monte Carlo predictions with entropy and mutual information, and the pandas / ArviZ exports."""

import math
import warnings

import pyro
import pytest
import torch
import torch.nn.functional as F
from planted import planted_problem
from pyro.distributions import constraints
from torch.testing import assert_close

from vtvc_pyro.data import collate_items
from vtvc_pyro.guide import AmortizedGuide
from vtvc_pyro.model import VTVCModel
from vtvc_pyro.posterior import Posterior, coefficient_predictor


@pytest.fixture(scope="module")
def problem():
    return planted_problem(num_per_task=12)


def make(problem, gating="gated", prior=None, **kwargs):
    model = VTVCModel(problem.encoder, problem.heads, prior, problem.task_names, problem.block_names)
    kwargs = {"init_prob": 0.5, "init_loc": 0.06, "init_weight_scale": 3.0, **kwargs}
    guide = AmortizedGuide(19, problem.task_names, problem.block_names, prior, gating=gating, **kwargs)
    return model, guide, Posterior(model, guide, batch_size=10)


def test_summary_holds_the_guide_components_and_gate_decisions(problem):
    model, guide, post = make(problem)
    summary = post.summarize(problem.data)
    images = collate_items(problem.data, torch.arange(36))[0]
    features0 = F.normalize(images @ problem.encoder.base, dim=-1)
    logits, loc, scale = (t.detach() for t in guide.components(features0))
    assert_close(summary["loc"], loc)
    assert_close(summary["scale"], scale)
    # inclusion is p_eff = sigmoid(ℓ) · F, F the filter on the summary's own components (batching may move
    # values near the threshold by rounding); the evaluation gate is 1[p_eff ≥ 0.5]
    loc, scale = summary["loc"], summary["scale"]
    tau = 0.05 * (1 + torch.tanh(scale / (loc.abs() + 1e-6)))
    p_eff = torch.sigmoid(logits) * (loc.abs() >= tau)
    assert_close(summary["inclusion"], p_eff)
    gate = (p_eff >= 0.5).float()
    assert torch.equal(summary["gate"], gate) and 0 < gate.mean() < 1
    assert torch.equal(summary["coef"], gate * loc)
    assert torch.equal(summary["task"], torch.arange(3).repeat_interleave(12))


def test_tables_and_task_coefficients_match_hand_computed_means(problem):
    _, _, post = make(problem)
    summary = post.summarize(problem.data)
    coef_beta = summary["coef"][12:24]  # the samples of data task "beta"
    assert_close(post.task_coefficients(summary)["beta"], coef_beta.mean(0))
    frame = post.to_dataframe(summary)
    assert len(frame) == 36 * 3 * 2
    row = frame[(frame["sample"] == 14) & (frame["task"] == "gamma") & (frame["block"] == "block1")].iloc[0]
    assert row["data_task"] == "beta"
    assert row["coef"] == pytest.approx(summary["coef"][14, 2, 1].item())
    table = post.component_summary(summary)
    assert table.loc[("gamma", "block1"), "active"] == pytest.approx(summary["gate"][:, 2, 1].mean().item())
    assert table.loc[("alpha", "block0"), "coef_std"] == pytest.approx(
        summary["coef"][:, 0, 0].std(unbiased=False).item(), abs=1e-6)
    by_task = post.component_summary(summary, by_data_task=True)
    expected = coef_beta[:, 2, 1].mean().item()
    assert by_task.loc[("beta", "gamma", "block1"), "coef_mean"] == pytest.approx(expected)


def test_deterministic_prediction_is_the_gated_composition_through_each_samples_head(problem):
    model, guide, post = make(problem)
    images, _, task = collate_items(problem.data, torch.arange(0, 36, 5))
    features0 = F.normalize(images @ problem.encoder.base, dim=-1)
    coef = guide.point_coef(features0)
    for predict in (post.predict, coefficient_predictor(model.frozen, guide.point_coef)):
        probs = predict(images, task)
        for n in range(len(images)):
            head = problem.heads[problem.task_names[task[n]]]
            expected = torch.softmax(head(problem.encoder(images[n:n + 1], coef[n:n + 1]))[0], -1)
            assert_close(probs[n, : head.num_classes], expected)


def test_monte_carlo_predictive_averages_guide_draws_and_splits_the_uncertainty(problem):
    model, guide, post = make(problem, gating="ungated", init_scale=0.3)
    pred = post.predictive(problem.data, num_samples=6, keep_draws=True)
    assert pred["coef"].shape == (6, 36, 3, 2)
    assert_close(pred["coef"], pred["gate"] * pred["slab"])
    images, labels, task = collate_items(problem.data, torch.arange(36))
    # the predictive by hand from the returned draws: coef -> composed encoder -> each sample's own head
    probs = torch.stack([problem.heads.logits(problem.encoder(images, c), task).softmax(-1)
                         for c in pred["coef"]])
    mean = probs.mean(0)
    entropy = -(mean * mean.clamp_min(1e-30).log()).sum(-1)
    expected_entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean(0)
    assert_close(pred["probs"], mean)
    assert_close(pred["entropy"], entropy)
    assert_close(pred["mutual_information"], entropy - expected_entropy)
    picked = probs.gather(-1, labels[None, :, None].expand(6, -1, 1))[..., 0]
    assert_close(pred["log_likelihood"], picked.log())
    assert (pred["mutual_information"] > 1e-4).any() and (pred["mutual_information"] > -1e-6).all()
    assert (pred["entropy"] <= math.log(4) + 1e-6).all()
    assert torch.equal(pred["labels"], labels)


def test_predictive_draws_follow_the_guide(problem):
    """Predictive(model, guide) samples what the guide samples: with sampled gates, the share of draws
    keeping a component approaches its inclusion probability sigmoid(ℓ) (binomial, within 5 sigma)."""
    _, guide, post = make(problem, gating="ungated")
    pyro.set_rng_seed(1)
    draws = post.predictive(problem.data, num_samples=300, keep_draws=True)
    inclusion = post.summarize(problem.data)["inclusion"]
    sigma = (inclusion * (1 - inclusion) / 300).sqrt()
    assert ((draws["gate"].mean(0) - inclusion).abs() <= 5 * sigma + 1e-3).all()
    quantiles = post.quantiles(problem.data, [0.1, 0.5, 0.9], num_samples=200)
    assert quantiles["slab"].shape == (3, 36, 3, 2)
    assert (quantiles["slab"][0] <= quantiles["slab"][1]).all()
    assert (quantiles["slab"][1] <= quantiles["slab"][2]).all()
    median = post.median(problem.data, num_samples=200)["slab"]
    loc, scale = (post.summarize(problem.data)[k] for k in ("loc", "scale"))
    # where the gate is kept the slab is Normal(loc, scale): its median is loc (here within 0.3 scale)
    kept = draws["gate"].mean(0) > 0.9
    assert ((median - loc).abs()[kept] <= 0.3 * scale[kept] + 1e-3).all()
    with pytest.raises(ValueError, match=r"quantiles must be a non-empty list in \[0, 1\]"):
        post.quantiles(problem.data, [1.5])


def test_a_single_draw_has_no_mutual_information(problem):
    _, _, post = make(problem, gating="ungated")
    pred = post.predictive(problem.data, num_samples=1)
    assert_close(pred["mutual_information"], torch.zeros(36), atol=1e-6, rtol=0)


def test_inference_data_export(problem):
    _, guide, post = make(problem, gating="ungated")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        idata = post.to_inference_data(problem.data, num_samples=4)
    coef = idata.posterior["coef"]
    assert coef.dims == ("chain", "draw", "sample", "task", "block")
    assert coef.shape == (1, 4, 36, 3, 2)
    assert list(coef["task"].values) == ["alpha", "beta", "gamma"]
    product = idata.posterior["gate"] * idata.posterior["slab"]
    assert_close(torch.as_tensor(coef.values), torch.as_tensor(product.values))
    assert idata.log_likelihood["obs"].shape == (1, 4, 36)
    assert (idata.log_likelihood["obs"].values <= 0).all()
    assert list(idata.observed_data["obs"].values) == [problem.data[i][2] for i in range(36)]
    assert idata.posterior_predictive["obs"].shape == (1, 4, 36)
    tasks = [t for t in ("alpha", "beta", "gamma") for _ in range(12)]
    assert list(idata.constant_data["data_task"].values) == tasks
    assert idata.sample_stats["entropy"].shape == (1, 4, 36)


def test_prior_inclusion_is_pi_or_its_posterior_mean_under_a_hyper_prior(problem):
    fixed = {"pi": 0.3, "overrides": [{"tasks": "beta", "pi": 0.8}]}
    learned = {"pi_prior": {"a": 2.0, "b": 3.0}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        _, _, post = make(problem, prior=fixed)
        got = post.to_inference_data(problem.data, num_samples=2).constant_data["prior_inclusion"].values
        assert_close(torch.as_tensor(got), torch.tensor([[0.3, 0.3], [0.8, 0.8], [0.3, 0.3]]))
        _, guide, post = make(problem, prior=learned)
        with torch.no_grad():  # q(pi) = Beta(alpha, 4), alpha = 1..6: mean alpha / (alpha + 4)
            guide.pi_alpha = torch.arange(1.0, 7.0).reshape(3, 2)
            guide.pi_beta = torch.full((3, 2), 4.0)
        got = post.to_inference_data(problem.data, num_samples=2).constant_data["prior_inclusion"].values
    assert_close(torch.as_tensor(got), torch.tensor([[1 / 5, 2 / 6], [3 / 7, 4 / 8], [5 / 9, 6 / 10]]))


def test_gaussian_guides_have_inclusion_one_and_no_gate(problem):
    _, _, post = make(problem, prior={"kind": "gaussian"})
    summary = post.summarize(problem.data)
    assert torch.equal(summary["inclusion"], torch.ones(36, 3, 2))
    assert torch.equal(summary["coef"], summary["loc"])


def test_read_outs_neither_read_nor_write_the_global_param_store(problem):
    prior = {"kind": "spike_and_slab", "pi_prior": {"a": 2.0, "b": 3.0}}
    _, guide, post = make(problem, gating="ungated", prior=prior)
    # another fit's parameter under the same name: Pyro would otherwise load it into the guide
    pyro.param("pi_alpha", torch.full((3, 2), 50.0), constraint=constraints.positive)
    post.predictive(problem.data, num_samples=2)
    post.summarize(problem.data)
    assert_close(guide.pi_alpha, torch.full((3, 2), 2.0))
    assert set(pyro.get_param_store().keys()) == {"pi_alpha"}
    assert_close(pyro.param("pi_alpha"), torch.full((3, 2), 50.0))
