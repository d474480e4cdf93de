"""The SVI engine: configuration, data order, pre-trained feature cache, the per-step objective and its parts,
exact checkpoint/resume, unreadable checkpoints, the NaN guard, param-store hygiene, and recovery of a planted
sparse composition."""

import math
from pathlib import Path

import pyro
import pytest
import torch
import torch.nn.functional as F
from planted import planted_problem
from torch.testing import assert_close

from vtvc_pyro.baselines import ATLASModel, MetaNetModel, empty_guide
from vtvc_pyro.experiment.config import load_config
from vtvc_pyro.guide import AmortizedGuide, TaskLevelGuide
from vtvc_pyro.inference import (
    CheckpointError,
    SVIConfig,
    fit_svi,
    load_checkpoint,
    load_fitted,
    pretrained_features,
    save_fitted,
)
from vtvc_pyro.model import NonFiniteError, VTVCModel

MAIN_JOB = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "quickstart.yaml"

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
    assert len(fit.history) == 3 and fit.start_step == 0


@pytest.mark.parametrize(("gating", "elbo"), [("ungated", "trace"), ("gated", "meanfield")])
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
    assert resumed.history == full.history
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


def test_step_records_of_a_baseline_are_its_log_likelihood_with_no_kl(problem):
    """With the empty guide the ELBO is the data-scaled log-likelihood; at λ = 0 it is the heads' log-softmax
    on the pre-trained features, which we compute by hand for the full batch."""
    model = ATLASModel(problem.encoder, problem.heads, problem.task_names, problem.block_names)
    seen = []
    fit_svi(model, empty_guide, problem.data, config(steps=2, batch_size=len(problem.data), elbo="trace",
                                                     kl_weight=1.0, kl_anneal_steps=0), callback=seen.append)
    x = torch.stack([problem.data[i][1] for i in range(len(problem.data))])
    labels = torch.tensor([problem.data[i][2] for i in range(len(problem.data))])
    expected = 0.0
    for n, task in enumerate(problem.data.task_ids.tolist()):
        head = problem.heads[problem.task_names[task]]
        expected += torch.log_softmax(head(x[n:n + 1] @ problem.encoder.base)[0], -1)[labels[n]].item()
    first = seen[0]
    assert first.expected_log_likelihood == pytest.approx(expected / len(problem.data), rel=1e-5)
    assert first.kl == 0.0
    assert first.elbo == first.tempered_elbo == first.expected_log_likelihood


@pytest.mark.parametrize("elbo", ["meanfield", "trace"])
def test_step_records_name_the_tempered_objective_the_elbo_and_its_parts(problem, elbo):
    """At step 1 the KL per datum is the mean over the data of the analytic per-component KL at the initial
    guide (meanfield exactly; trace as a Monte Carlo estimate), and the records satisfy
    tempered_elbo = log-likelihood − kl_scale · KL, elbo = log-likelihood − KL."""
    model, guide = make(problem)
    features0 = pretrained_features(model.frozen, problem.data)
    with torch.no_grad():
        logits, loc, scale = guide.components(features0)
        p = torch.sigmoid(logits)
        keep = (loc.abs() >= 0.05 * (1 + torch.tanh(scale / (loc.abs() + 1e-6)))).float()
        kl_gate = p * (p / 0.5).log() + (1 - p) * ((1 - p) / 0.5).log()
        kl_slab = p * ((1 / scale).log() + (scale**2 + loc**2) / 2 - 0.5)
        expected_kl = (keep * (kl_gate + kl_slab) + (1 - keep) * math.log(2)).sum((1, 2)).mean().item()
    seen = []
    cfg = config(steps=3, batch_size=len(problem.data), elbo=elbo, kl_weight=0.2, kl_anneal_steps=2)
    fit = fit_svi(model, guide, problem.data, cfg, features0=features0, callback=seen.append)
    assert seen == fit.history and [r.kl_scale for r in seen] == [0.1, 0.2, 0.2]
    first = seen[0]
    assert first.kl == pytest.approx(expected_kl, rel=1e-5 if elbo == "meanfield" else 0.5)
    for record in seen:
        ell, kl = record.expected_log_likelihood, record.kl
        assert record.tempered_elbo == pytest.approx(ell - record.kl_scale * kl, rel=1e-9)
        assert record.elbo == pytest.approx(ell - kl, rel=1e-9)
        assert ell < 0 < kl
    assert fit.elbo == [r.elbo for r in seen] and fit.kl == [r.kl for r in seen]


def test_an_unreadable_checkpoint_is_one_error_naming_the_file_and_a_restart_works(problem, tmp_path):
    path = tmp_path / "svi.pt"
    model, guide = make(problem)
    fit_svi(model, guide, problem.data, config(steps=3), checkpoint_path=path)
    data = path.read_bytes()
    for cut in (0, 100, len(data) // 2, len(data) - 10):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"svi.pt: unreadable SVI checkpoint \(truncated") as err:
            fit_svi(model, guide, problem.data, config(steps=3), checkpoint_path=path)
        assert "\n" not in str(err.value)
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="svi.pt: unreadable SVI checkpoint"):
        load_checkpoint(path)
    torch.save({"format": "vtvc-svi-checkpoint/1"}, path)
    with pytest.raises(CheckpointError, match=r"svi.pt: not a vtvc-svi-checkpoint/2 checkpoint \(found "):
        load_checkpoint(path)
    fit = fit_svi(model, guide, problem.data, config(steps=3), checkpoint_path=path, resume=False)
    assert fit.start_step == 0 and load_checkpoint(path)["step"] == 3


def test_a_checkpoint_with_non_finite_values_is_refused_naming_file_and_parameter(problem, tmp_path):
    path = tmp_path / "svi.pt"
    model, guide = make(problem)
    fit_svi(model, guide, problem.data, config(steps=3), checkpoint_path=path)
    state = load_checkpoint(path)
    state["step"] = 2
    state["params"]["net.2.bias"][4] = float("nan")
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"svi.pt: parameter 'net.2.bias' holds non-finite values"):
        fit_svi(model, guide, problem.data, config(steps=3), checkpoint_path=path)
    state["params"]["net.2.bias"][4] = 0.0
    next(iter(state["optimizer"].values()))["state"][0]["exp_avg"].fill_(float("inf"))
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"svi.pt: optimizer state\['net.0.weight'\]\['state'\]\[0\]"):
        load_checkpoint(path)


def test_fitted_modules_round_trip_and_non_finite_files_are_refused(problem, tmp_path):
    model, guide = make(problem)
    path = tmp_path / "fitted.safetensors"
    save_fitted(guide, path, {"method": "vtvc"})
    _, other = make(problem, seed=5)
    load_fitted(other, path)
    for name, value in other.state_dict().items():
        assert torch.equal(value, guide.state_dict()[name]), name
    with torch.no_grad():
        guide.net[0].bias[1] = float("inf")
    save_fitted(guide, path)
    with pytest.raises(ValueError, match=r"fitted.safetensors: tensor 'net.0.bias' holds non-finite values"):
        load_fitted(other, path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match=r"fitted.safetensors: unreadable fitted-module file"):
        load_fitted(other, path)
    save_fitted(TaskLevelGuide(problem.task_names, problem.block_names), path)
    with pytest.raises(ValueError, match=r"fitted.safetensors: tensors \[.*\] are in only one of the file"):
        load_fitted(other, path)


def test_a_non_finite_task_level_guide_parameter_names_parameter_and_step(problem):
    model = VTVCModel(problem.encoder, problem.heads, None, problem.task_names, problem.block_names)
    guide = TaskLevelGuide(problem.task_names, problem.block_names)
    after = {}

    def callback(info):
        after[info.step] = params_of(guide)
        if info.step == 2:
            with torch.no_grad():
                pyro.get_param_store()["slab_loc"].unconstrained()[1, 0] = float("nan")

    message = r"step 3: sites 'gate', 'slab': parameter 'slab_loc' has 1 non-finite value\(s\) of 6"
    with pytest.raises(NonFiniteError, match=message):
        fit_svi(model, guide, problem.data, config(steps=5), callback=callback)
    with torch.no_grad():
        guide.gate_logits[0, 1] = float("inf")
    with pytest.raises(NonFiniteError, match=r"step 1: sites 'gate', 'slab': parameter 'gate_logits' has 1 "):
        fit_svi(model, guide, problem.data, config(steps=5))


@pytest.mark.parametrize("kind", ["atlas", "metanet"])
def test_baselines_go_through_the_same_parameter_check(problem, kind):
    if kind == "atlas":
        model = ATLASModel(problem.encoder, problem.heads, problem.task_names, problem.block_names)
        model.coefficients.data[0, 0] = float("nan")
        name = "coefficients"
    else:
        model = MetaNetModel(problem.encoder, problem.heads, 19, problem.task_names, problem.block_names)
        model.net[2].weight.data[0, 0] = float("nan")
        name = "net.2.weight"
    with pytest.raises(NonFiniteError, match=rf"step 1: site 'coef': parameter '{name}' has 1 non-finite"):
        fit_svi(model, empty_guide, problem.data, config(steps=2, elbo="trace"))


def test_a_nan_in_the_first_batch_names_step_one(problem):
    def encoder(x, coef):
        return problem.encoder(x, coef) * float("nan")

    model, guide = make(problem, encoder=encoder)
    before = params_of(guide)
    features0 = torch.zeros(len(problem.data), 19)
    with pytest.raises(NonFiniteError, match=r"step 1: site 'obs': the logits .* non-finite") as err:
        fit_svi(model, guide, problem.data, config(steps=3), features0=features0)
    assert "parameters restored to their initial values" in str(err.value)
    for name, value in params_of(guide).items():
        assert torch.equal(value, before[name]), name


def _recovery(steps: int, prior: dict | None = None) -> dict[str, float]:
    """Fit the default VTVC (with ``prior``, default METHOD §2's) on the planted problem with a noise task
    vector; score on fresh inputs."""
    problem = planted_problem(num_per_task=120, noise_vectors=1, num_test=200)
    torch.manual_seed(0)
    model = VTVCModel(problem.encoder, problem.heads, prior, problem.task_names, problem.block_names)
    guide = AmortizedGuide(problem.feature_dim, problem.task_names, problem.block_names, prior, hidden_dim=16)
    assert guide.gating == "gated"
    cfg = SVIConfig(steps=steps, batch_size=64, lr=0.02, kl_weight=0.03, progress=False)
    fit = fit_svi(model, guide, problem.data, cfg)
    test = problem.test
    x = torch.stack([test[i][1] for i in range(len(test))])
    labels = torch.tensor([test[i][2] for i in range(len(test))])
    task, num_vectors = test.task_ids, len(problem.task_names)

    def accuracy(coef):
        predicted = problem.heads.logits(problem.encoder(x, coef), task).argmax(-1)
        return (predicted == labels).float().mean().item()

    features0 = torch.nn.functional.normalize(problem.encoder(x, torch.zeros(len(x), num_vectors, 2)), dim=-1)
    inclusion, coef = guide.inclusion(features0), guide.point_coef(features0)
    needed = min(inclusion[task == k][:, problem.truth[k]].mean(0).min().item() for k in range(3))
    global_best = max(accuracy(torch.full((len(x), num_vectors, 2), alpha / 20)) for alpha in range(41))
    out = {"needed": needed, "noise": inclusion[:, -1].mean().item(), "accuracy": accuracy(coef),
           "global": global_best, "objective_gain": fit.tempered_elbo[-1] - fit.tempered_elbo[0]}
    print(f"planted recovery at {steps} steps: " + ", ".join(f"{k} {v:.3f}" for k, v in out.items()))
    return out


def _check_recovery(out: dict[str, float]) -> None:
    assert out["needed"] >= 0.9, "the components a task needs should be included"
    assert out["noise"] <= 0.2, "the noise task vector should be left out"
    assert out["accuracy"] >= out["global"] + 0.3, "sample-specific gates should beat any global coefficient"
    assert out["objective_gain"] > 0


PRIORS = {"method default": None,  # METHOD §2: pi = 0.5 fixed
          "main job": load_config(MAIN_JOB).prior}  # pi[t, b] ~ Beta(1, 1), learned from all samples


def test_the_main_job_learns_its_usage_rates():
    assert PRIORS["main job"].hierarchical


@pytest.mark.parametrize("prior", PRIORS)
def test_default_vtvc_recovers_a_planted_sparse_composition(prior):
    """Each task's labels come from some blocks of its own task vector; a fourth task vector is pure noise.
    The default (gated) posterior includes what each task needs with p_eff ≥ 0.9, the noise with ≤ 0.2."""
    _check_recovery(_recovery(200, PRIORS[prior]))


@pytest.mark.slow
@pytest.mark.parametrize("prior", PRIORS)
def test_default_vtvc_recovery_holds_at_four_times_the_steps(prior):
    _check_recovery(_recovery(800, PRIORS[prior]))
