"""Declarative priors: parsing, validation, overrides, and each site's log-density against its closed form."""

import math

import pytest
import torch
from torch.testing import assert_close

from vtvc_pyro.priors import BetaSpec, NormalSpec, PriorOverride, PriorSpec, as_prior

TASKS = ["mnist", "svhn", "dtd"]
BLOCKS = ["conv1.weight", "transformer.resblocks.0.attn.in_proj_weight",
          "transformer.resblocks.1.mlp.c_fc.bias", "proj"]


def test_mapping_and_dataclass_are_the_same_spec():
    mapping = {"kind": "spike_and_slab", "slab": {"loc": 0.1, "scale": 2.0}, "pi_prior": {"a": 2, "b": 3},
               "overrides": [{"tasks": "mnist", "blocks": "transformer.*", "slab": {"scale": 0.5}}]}
    spec = PriorSpec(slab=NormalSpec(0.1, 2.0), pi_prior=BetaSpec(2, 3),
                     overrides=(PriorOverride(tasks="mnist", blocks="transformer.*", slab_scale=0.5),))
    assert PriorSpec.from_mapping(mapping) == spec
    assert PriorSpec.from_mapping(spec.to_mapping()) == spec
    fixed = {"kind": "spike_and_slab", "pi": 0.3, "overrides": [{"tasks": "mnist", "pi": 0.7}]}
    overrides = (PriorOverride(tasks="mnist", pi=0.7),)
    assert PriorSpec.from_mapping(fixed) == PriorSpec(pi=0.3, overrides=overrides)
    assert as_prior(None) == PriorSpec(kind="spike_and_slab", pi=0.5, slab=NormalSpec(0.0, 1.0))


@pytest.mark.parametrize(("mapping", "message"), [
    ({"kind": "spike_and_slab", "pie": 0.5},
     r"prior\.pie: unknown field; allowed: kind, pi, slab, temperature"),
    ({"kind": "laplace"}, r"kind: 'laplace' is not a prior kind; allowed: spike_and_slab, gaussian"),
    ({"kind": "spike_and_slab", "pi": 1.5}, r"^pi: 1\.5 is outside \(0\.0, 1\.0\)"),
    ({"kind": "spike_and_slab", "slab": {"scale": -1}}, r"slab\.scale: -1"),
    ({"kind": "spike_and_slab", "slab": {"sd": 1}}, r"prior\.slab\.sd: unknown field; allowed: loc, scale"),
    ({"kind": "spike_and_slab", "temperature": 0}, r"temperature: 0"),
    ({"kind": "spike_and_slab", "pi_prior": {"a": 1, "c": 2}},
     r"prior\.pi_prior\.c: unknown field; allowed: a, b"),
    ({"kind": "gaussian", "temperature": 0.5}, r"temperature: a gaussian prior has no spike"),
    ({"kind": "spike_and_slab", "overrides": [{"block": "proj"}]},
     r"prior\.overrides\[0\]\.block: unknown field; allowed: tasks, blocks, pi, slab, pi_prior"),
    ({"kind": "spike_and_slab", "overrides": [{"pi_prior": {"a": 1, "b": 1}}]},
     r"overrides\[0\]\.pi_prior: needs a global prior\.pi_prior"),
    ({"kind": "spike_and_slab", "pi_prior": {"a": 1, "b": 1}, "overrides": [{"pi": 0.2}]},
     r"overrides\[0\]\.pi: pi is latent under pi_prior"),
    ({"kind": "spike_and_slab", "pi": 0.1, "pi_prior": {"a": 1, "b": 1}},
     r"^pi: 0\.1 is unused: pi is latent under pi_prior"),
    ({"kind": "spike_and_slab", "pi": "half"}, r"^pi: expected a finite number, got 'half'"),
])
def test_validation_names_the_bad_field(mapping, message):
    with pytest.raises(ValueError, match=message):
        PriorSpec.from_mapping(mapping)


def test_an_override_matching_nothing_is_an_error():
    spec = PriorSpec.from_mapping({"kind": "spike_and_slab", "overrides": [{"tasks": "mnsit", "pi": 0.1}]})
    message = r"prior\.overrides\[0\]: tasks='mnsit', blocks='\*' match no component"
    with pytest.raises(ValueError, match=message):
        spec.resolve(TASKS, BLOCKS)


def test_overrides_apply_per_task_and_block_pattern_in_order():
    spec = PriorSpec.from_mapping({
        "kind": "spike_and_slab", "pi": 0.5, "slab": {"loc": 0.0, "scale": 1.0},
        "overrides": [
            {"blocks": "transformer.*", "pi": 0.2},
            {"tasks": ["svhn", "dtd"], "blocks": "transformer.resblocks.1.*", "pi": 0.9,
             "slab": {"loc": 0.3}},
            {"tasks": "mnist", "blocks": ["proj", "conv1.*"], "slab": {"scale": 0.1}},
        ],
    })
    out = spec.resolve(TASKS, BLOCKS)
    expected_pi = torch.tensor([[0.5, 0.2, 0.2, 0.5],
                                [0.5, 0.2, 0.9, 0.5],
                                [0.5, 0.2, 0.9, 0.5]])
    expected_loc = torch.tensor([[0.0, 0.0, 0.0, 0.0],
                                 [0.0, 0.0, 0.3, 0.0],
                                 [0.0, 0.0, 0.3, 0.0]])
    expected_scale = torch.tensor([[0.1, 1.0, 1.0, 0.1],
                                   [1.0, 1.0, 1.0, 1.0],
                                   [1.0, 1.0, 1.0, 1.0]])
    assert_close(out["pi"], expected_pi)
    assert_close(out["slab_loc"], expected_loc)
    assert_close(out["slab_scale"], expected_scale)
    assert set(out) == {"pi", "slab_loc", "slab_scale"}


def test_spike_and_slab_log_densities_match_closed_forms():
    spec = PriorSpec.from_mapping({"kind": "spike_and_slab", "pi": 0.3, "slab": {"loc": 0.2, "scale": 1.5},
                                   "overrides": [{"tasks": "dtd", "pi": 0.8}]})
    sites = spec.distributions(TASKS, BLOCKS)
    assert set(sites) == {"gate", "slab"}
    assert sites["gate"].batch_shape == sites["slab"].batch_shape == (3, 4)
    gate = torch.tensor([[1.0, 0.0, 1.0, 0.0]] * 3)
    pi = torch.tensor([[0.3] * 4, [0.3] * 4, [0.8] * 4])
    # log Bernoulli(g; π) = g log π + (1 − g) log(1 − π)
    assert_close(sites["gate"].log_prob(gate), gate * pi.log() + (1 - gate) * (1 - pi).log())
    x = torch.linspace(-2, 2, 12).view(3, 4)
    # log N(x; m, s) = −½ log(2π s²) − (x − m)² / (2 s²)
    expected = -0.5 * math.log(2 * math.pi * 1.5**2) - (x - 0.2) ** 2 / (2 * 1.5**2)
    assert_close(sites["slab"].log_prob(x), expected)


def test_relaxed_spike_log_density_matches_the_binary_concrete_density():
    spec = PriorSpec.from_mapping({"kind": "spike_and_slab", "pi": 0.3, "temperature": 0.5})
    gate = spec.distributions(TASKS, BLOCKS)["gate"]
    y = torch.linspace(0.05, 0.95, 12).view(3, 4)
    lam, alpha = 0.5, 0.3 / 0.7
    # Binary Concrete (Maddison et al. 2017): p(y) = λ α y^(−λ−1) (1−y)^(−λ−1) / (α y^(−λ) + (1−y)^(−λ))²
    density = lam * alpha * y ** (-lam - 1) * (1 - y) ** (-lam - 1) / (alpha * y**-lam + (1 - y) ** -lam) ** 2
    assert_close(gate.log_prob(y), density.log(), rtol=1e-4, atol=1e-5)


def test_beta_hyper_prior_log_density_matches_closed_form():
    spec = PriorSpec.from_mapping({"kind": "spike_and_slab", "pi_prior": {"a": 2.0, "b": 5.0},
                                   "overrides": [{"blocks": "proj", "pi_prior": {"a": 1.0, "b": 1.0}}]})
    sites = spec.distributions(TASKS, BLOCKS)
    assert set(sites) == {"pi", "gate", "slab"}
    x = torch.full((3, 4), 0.3)
    a = torch.tensor([2.0, 2.0, 2.0, 1.0]).expand(3, 4)
    b = torch.tensor([5.0, 5.0, 5.0, 1.0]).expand(3, 4)
    # log Beta(x; a, b) = (a−1) log x + (b−1) log(1−x) − [lnΓ(a) + lnΓ(b) − lnΓ(a+b)]
    expected = (a - 1) * math.log(0.3) + (b - 1) * math.log(0.7) - (
        torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b))
    assert_close(sites["pi"].log_prob(x), expected)
    # the gate of `distributions` is taken at the hyper-prior mean a / (a + b)
    assert_close(sites["gate"].probs, a / (a + b))


def test_gaussian_prior_has_only_a_slab():
    spec = PriorSpec.from_mapping({"kind": "gaussian", "slab": {"loc": 0.3, "scale": 0.5}})
    sites = spec.distributions(TASKS, BLOCKS)
    assert set(sites) == {"slab"}
    assert not spec.has_spike and not spec.relaxed and not spec.hierarchical
    assert_close(sites["slab"].mean, torch.full((3, 4), 0.3))
