"""The SVI engine: configuration, data order, pre-trained feature cache, exact checkpoint/resume, the NaN
guard, param-store hygiene, and recovery of a planted sparse composition."""

import pyro
import pytest
import torch
import torch.nn.functional as F
from planted import planted_problem
from torch.testing import assert_close

from vtvc_pyro.guide import AmortizedGuide
from vtvc_pyro.inference import SVIConfig, fit_svi, load_checkpoint, pretrained_features
from vtvc_pyro.model import NonFiniteError, VTVCModel

GUIDE_PARAMS = {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}


@pytest.fixture(scope="module")
def problem():
    return planted_problem(num_per_task=20)


def make(problem, gating="gated", seed=0, encoder=None):
    torch.manual_seed(seed)
    encoder = encoder or problem.encoder
    model = VTVCModel(encoder, problem.heads, None, problem.task_names, problem.block_names)
    guide = AmortizedGuide(19, problem.task_names, problem.block_names, hidden_dim=8, gating=gating)
    return model, guide


def config(**overrides):
    return SVIConfig(**{"steps": 12, "batch_size": 16, "lr": 0.02, "progress": False, **overrides})


def params_of(guide):
    return {name: p.detach().clone() for name, p in guide.named_parameters()}


@pytest.mark.parametrize(("overrides", "message"), [
    ({"steps": 0}, "svi.steps: must be a positive integer"),
    ({"elbo": "renyi"}, "svi.elbo: 'renyi' is not an ELBO; allowed: meanfield, trace"),
    ({"lr_decay": 0.0}, r"svi.lr_decay: must be in \(0, 1\]"),
    ({"kl_weight": -1.0}, "svi.kl_weight: must be > 0"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        SVIConfig(**overrides)
    with pytest.raises(ValueError, match="svi.stepz: unknown field; allowed: steps, batch_size"):
        SVIConfig.from_mapping({"stepz": 3})


def test_kl_annealing_schedule_and_total_learning_rate_decay(problem):
    cfg = config(steps=10, kl_weight=0.5, kl_anneal_steps=4, lr=0.01, lr_decay=0.25)
    assert [cfg.kl_scale(s) for s in (1, 2, 4, 9)] == [0.125, 0.25, 0.5, 0.5]
    model, guide = make(problem)
    seen = []
    fit_svi(model, guide, problem.data, cfg, callback=seen.append)
    assert [info.kl_scale for info in seen[:5]] == [0.125, 0.25, 0.375, 0.5, 0.5]
    assert seen[-1].lr == pytest.approx(0.01 * 0.25)


def test_each_epoch_visits_every_sample_once(problem):
    seen = []

    def recording_model(batch, kl_scale=1.0):
        seen.append(batch.index)

    features0 = torch.zeros(len(problem.data), 19)
    fit_svi(recording_model, lambda batch, kl_scale=1.0: None, problem.data, config(steps=8, batch_size=16),
            features0=features0)
    per_epoch = 4  # ceil(60 / 16)
    for epoch in range(2):
        visited = torch.cat(seen[1 + epoch * per_epoch: 1 + (epoch + 1) * per_epoch])  # seen[0]: registration
        assert sorted(visited.tolist()) == list(range(60))


def test_pretrained_features_are_normalized_encodings_at_zero_and_cached(problem, tmp_path):
    model, _ = make(problem)
    x = torch.stack([problem.data[i][1] for i in range(len(problem.data))])
    expected = F.normalize(x @ problem.encoder.base, dim=-1)  # θ(0) = θ0
    cache = tmp_path / "features0.safetensors"
    assert_close(pretrained_features(model.frozen, problem.data, batch_size=7, cache_path=cache), expected)
    calls = problem.encoder.calls
    assert_close(pretrained_features(model.frozen, problem.data, cache_path=cache), expected)
    assert problem.encoder.calls == calls + 1, "a valid cache is checked on its first items only"
    stale = planted_problem(num_per_task=20, seed=3)
    stale_model = VTVCModel(stale.encoder, stale.heads, None, stale.task_names, stale.block_names)
    rebuilt = pretrained_features(stale_model.frozen, stale.data, cache_path=cache)
    x_stale = torch.stack([stale.data[i][1] for i in range(len(stale.data))])
    assert_close(rebuilt, F.normalize(x_stale @ stale.encoder.base, dim=-1))


def test_fit_uses_only_guide_parameters_and_leaves_the_global_store_alone(problem):
    pyro.param("unrelated", torch.ones(2))
    model, guide = make(problem)
    stored = []
    fit = fit_svi(model, guide, problem.data, config(steps=3),
                  callback=lambda info: stored.append(set(pyro.get_param_store().keys())))
    assert stored == [GUIDE_PARAMS] * 3
    assert set(pyro.get_param_store().keys()) == {"unrelated"}
    assert len(fit.losses) == 3 and fit.start_step == 0


@pytest.mark.parametrize(("gating", "elbo"), [("stochastic", "trace"), ("gated", "meanfield")])
def test_a_resumed_run_continues_exactly_like_an_uninterrupted_one(problem, tmp_path, gating, elbo):
    cfg = config(steps=12, elbo=elbo, checkpoint_every=5)
    model, guide = make(problem, gating)
    full = fit_svi(model, guide, problem.data, cfg)
    expected = params_of(guide)

    class Interrupt(Exception):
        pass

    def interrupt_at_5(info):
        if info.step == 5:
            raise Interrupt

    path = tmp_path / "svi.pt"
    model, guide = make(problem, gating)
    with pytest.raises(Interrupt):
        fit_svi(model, guide, problem.data, cfg, checkpoint_path=path, callback=interrupt_at_5)
    assert load_checkpoint(path)["step"] == 5
    torch.manual_seed(123)  # a fresh process: other RNG state, other initial parameters
    model, guide = make(problem, gating, seed=99)
    resumed = fit_svi(model, guide, problem.data, cfg, checkpoint_path=path)
    assert resumed.start_step == 5
    assert resumed.losses == full.losses
    for name, value in params_of(guide).items():
        assert torch.equal(value, expected[name]), name
    assert load_checkpoint(path)["step"] == 12


def test_resuming_with_a_changed_config_is_refused(problem, tmp_path):
    path = tmp_path / "svi.pt"
    model, guide = make(problem)
    fit_svi(model, guide, problem.data, config(steps=4), checkpoint_path=path)
    with pytest.raises(ValueError, match=r"cannot resume with changed svi.lr \(0.02 -> 0.05\)"):
        fit_svi(model, guide, problem.data, config(steps=4, lr=0.05), checkpoint_path=path)


def test_nan_guard_names_step_and_site_and_restores_the_last_finite_state(problem):
    poisoned = {"on": False}

    def encoder(x, coef):
        out = problem.encoder(x, coef)
        return out * float("nan") if poisoned["on"] else out

    model, guide = make(problem, encoder=encoder)
    after = {}

    def callback(info):
        after[info.step] = params_of(guide)
        if info.step == 6:
            poisoned["on"] = True

    message = r"step 7: site 'obs': the logits .* has \d+ non-finite value"
    with pytest.raises(NonFiniteError, match=message) as err:
        fit_svi(model, guide, problem.data, config(steps=10), callback=callback)
    assert "parameters restored to their values after step 6" in str(err.value)
    for name, value in params_of(guide).items():
        assert torch.equal(value, after[6][name]), name


def test_nan_guard_names_a_parameter_whose_gradient_is_non_finite(problem):
    model, guide = make(problem)
    before = params_of(guide)
    guide.net[0].weight.register_hook(lambda grad: grad * float("inf"))
    message = r"step 1: the gradient of parameter 'net.0.weight' is non-finite"
    with pytest.raises(NonFiniteError, match=message):
        fit_svi(model, guide, problem.data, config(steps=3))
    for name, value in params_of(guide).items():
        assert torch.equal(value, before[name]), name


def test_gated_vtvc_recovers_a_planted_sparse_composition():
    """Only some (task vector, block) components generated each task's labels; the fitted posterior should
    switch those on for that task's samples and the others off."""
    problem = planted_problem(num_per_task=120)
    torch.manual_seed(0)
    model = VTVCModel(problem.encoder, problem.heads, None, problem.task_names, problem.block_names)
    guide = AmortizedGuide(19, problem.task_names, problem.block_names, hidden_dim=16)
    fit = fit_svi(model, guide, problem.data, SVIConfig(steps=300, batch_size=64, lr=0.02, kl_weight=0.1,
                                                        progress=False))
    gate = guide.decision(fit.features0)
    task = problem.data.task_ids
    on = torch.stack([gate[task == k].mean(0) > 0.5 for k in range(3)])  # [data task, task vector, block]
    true_pos = int((on & problem.truth).sum())
    false_pos = int((on & ~problem.truth).sum())
    print(f"planted recovery: {true_pos}/{int(problem.truth.sum())} true positives, {false_pos}/"
          f"{int((~problem.truth).sum())} false positives")
    assert true_pos == int(problem.truth.sum()) and false_pos == 0
    assert fit.losses[-1] < fit.losses[0] / 3
