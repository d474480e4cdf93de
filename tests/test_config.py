"""Experiment configs: schema validation, dotted overrides, ``extends``, variants, shipped configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from pydantic import ValidationError

from vtvc_pyro.experiment.config import (
    ALPHA_GRID,
    METHODS,
    ConfigError,
    ExperimentConfig,
    digest,
    from_dict,
    load_config,
    parse_override,
    parse_yaml,
    to_yaml,
    variant_config,
)
from vtvc_pyro.guide import GuideConfig
from vtvc_pyro.inference import SVIConfig
from vtvc_pyro.priors import NormalSpec, PriorSpec

CONFIG_DIR = Path(__file__).resolve().parents[1] / "experiments" / "configs"


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_follow_the_method_page():
    cfg = from_dict({})
    assert cfg.methods == METHODS
    assert cfg.prior == PriorSpec()
    assert cfg.protocol.alpha_grid[0] == 0.0 and cfg.protocol.alpha_grid[-1] == 1.0
    assert len(ALPHA_GRID) == 21 and ALPHA_GRID[7] == pytest.approx(0.35)
    assert (cfg.guide.tau0, cfg.guide.beta, cfg.guide.sharpness) == (0.05, 1.0, 20.0)
    assert cfg.eval.ece_bins == 15


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"svi": {"stepz": 3}}, "svi.stepz: unknown key; allowed: steps, batch_size, lr, lr_decay"),
        ({"zoo": {"presett": "micro"}}, "zoo.presett: unknown key; allowed: preset, cache_dir"),
        ({"colour": 1}, "colour: unknown key; allowed: name, seed"),
        ({"svi": {"steps": "many"}}, "svi.steps: expected int, got str 'many'"),
        ({"svi": {"steps": True}}, "svi.steps: expected int, got bool True"),
        ({"svi": {"steps": "5"}}, "svi.steps: expected int, got str '5'"),
        ({"guide": {"tau0": True}}, "guide.tau0: expected float, got bool True"),
        ({"zoo": {"trust_pickle": "yes"}}, "zoo.trust_pickle: expected bool, got str 'yes'"),
        ({"eval": {"batch_size": 2.0}}, "eval.batch_size: input should be a valid integer"),
        ({"svi": {"steps": 2.5}}, "svi.steps: input should be a valid integer, got a number"),
        ({"svi": {"lr": "fast"}}, "svi.lr: expected float, got str 'fast'"),
        ({"svi": {"lr": 0}}, "svi.lr: must be > 0 and finite"),
        ({"svi": {"elbo": "renyi"}}, "svi.elbo: 'renyi' is not an ELBO; allowed: meanfield, trace"),
        ({"svi": 3}, "svi: input should be a dictionary"),
        ({"svi": {"seed": 3}}, "svi.seed: set by the run; use seed instead"),
        ({"zoo": {"tasks": "mnist"}}, "zoo.tasks: input should be a valid tuple; got 'mnist'"),
        ({"zoo": {"tasks": ["mnist", 3]}}, "zoo.tasks[1]: input should be a valid string; got 3"),
        ({"zoo": {"finetuned": {"mnist": 1}}}, "zoo.finetuned.mnist: input should be a valid string"),
        ({"protocol": {"ties_top_k": 1.5}}, "protocol.ties_top_k: input should be less than or equal to 1"),
        ({"protocol": {"name": "forgetting"}}, "protocol.name: input should be 'task_addition', 'knowledge"),
        ({"protocol": {"name": "negation"}}, "methods[3]: 'ties' has no negation form"),
        ({"protocol": {"name": "negation"}, "methods": ["finetuned", "vtvc"]},
         "methods: the negation protocol reports control accuracy relative to zeroshot"),
        ({"protocol": {"alpha_grid": []}}, "protocol.alpha_grid: tuple should have at least 1 item"),
        # issue 15 items 4 and 11: values the engine would refuse after other methods ran
        ({"svi": {"kl_weight": 0}}, "svi.kl_weight: must be > 0 and finite, got 0"),
        ({"svi": {"kl_weight": float("inf")}}, "svi.kl_weight: must be > 0 and finite, got inf"),
        ({"svi": {"lr": float("inf")}}, "svi.lr: must be > 0 and finite, got inf"),
        ({"seed": -1}, "seed: input should be greater than or equal to 0; got -1"),
        ({"protocol": {"alpha_grid": [0.5, float("nan")]}}, "protocol.alpha_grid[1]: input should be"),
        ({"zoo": {"tasks": []}}, "zoo.tasks: must name at least one task, or be null for every task"),
        ({"zoo": {"tasks": ["mnist", "svhn", "mnist"]}}, "zoo.tasks: task 'mnist' is listed twice"),
        ({"guide": {"tau0": -1}}, "guide.tau0: must be a finite number >= 0"),
        ({"guide": {"gatingg": "gated"}}, "guide.gatingg: unknown key; allowed: kind, hidden_dim, gating"),
        ({"methods": ["vtvc", "bayes"]}, "methods[1]: unknown method 'bayes'"),
        ({"methods": ["vtvc", "vtvc"]}, "methods[1]: 'vtvc' is listed twice"),
        ({"methods": ["vtvc_merged"]}, "methods: vtvc_merged merges the posterior of vtvc"),
        ({"blocks": "rows"}, "blocks: must be tensor, layer or a list"),
        ({"prior": {"pi": 0.2, "kindd": 1}}, "prior.kindd: unknown field; allowed: kind, pi"),
        ({"prior": {"kind": "laplace"}}, "prior.kind: 'laplace' is not a prior kind"),
        ({"prior": 3}, "prior: expected a mapping, got int 3"),
        ({"zoo": {"preset": None, "model": "ViT-B-32"}}, "zoo.pretrained: required when zoo.preset is null"),
        ({"zoo": {"pretrained": "/x.pt"}}, "zoo.pretrained: only for real checkpoints"),
        ({"variants": {"v": {"set": {}}}}, "variants.v.method: required key is missing"),
        ({"variants": {"v": {"method": "zeroshot"}}}, "variants.v.method: must be one of task_arithmetic"),
        ({"variants": {"vtvc": {"method": "vtvc"}}}, "variants.vtvc: a variant cannot take a built-in"),
        ({"variants": {"v": {"method": "vtvc", "set": {"seed": 3}}}}, "variants.v.set.seed: a variant may"),
        ({"variants": {"v": {"method": "vtvc", "set": {"svi.stepz": 3}}}}, "variants.v.set: svi.stepz: unkn"),
        ({"variants": {"a.b": {"method": "vtvc"}}}, "variants.a.b: a variant name may hold letters"),
        ({"threads": 0}, "threads: input should be greater than 0; got 0"),
        ({"prior": {"kind": "spike_and_slab", "pi": 2}}, "prior.pi: 2 is outside (0.0, 1.0)"),
        ({"prior": {"kind": "spike_and_slab", "temperature": 0.5}}, "guide.gating: a relaxed spike"),
    ],
)
def test_validation_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError) as info:
        from_dict(raw)
    assert str(info.value).startswith(message), str(info.value)


def test_error_is_a_value_error_so_the_cli_reports_it():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("--svi.steps=200", ("svi.steps", 200)),
        ("--svi.lr=1e-3", ("svi.lr", 0.001)),
        ("--svi.lr=2.5E-4", ("svi.lr", 0.00025)),
        ("--zoo.tasks=null", ("zoo.tasks", None)),
        ("--zoo.trust_pickle=true", ("zoo.trust_pickle", True)),
        ("--methods=[vtvc, atlas]", ("methods", ["vtvc", "atlas"])),
        ("--name=run=7", ("name", "run=7")),
        ("--prior.slab={loc: 0.3, scale: 2}", ("prior.slab", {"loc": 0.3, "scale": 2})),
    ],
)
def test_override_values_are_yaml_scalars(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("svi.steps=3", "override 'svi.steps=3': expected --key.sub=value"),
        ("--svi..steps=3", "override '--svi..steps=3': expected --key.sub=value"),
        ("--=3", "override '--=3': expected --key.sub=value"),
        ("--svi.steps", "svi.steps: override '--svi.steps' has no value"),
        ("--svi.steps=[1,", "svi.steps: override value: invalid YAML"),
    ],
)
def test_bad_override_syntax_names_the_key(text, message):
    with pytest.raises(ConfigError) as info:
        parse_override(text)
    assert str(info.value).startswith(message), str(info.value)


def test_overrides_apply_in_order_and_are_validated(tmp_path):
    path = write(tmp_path, "name: t\nsvi:\n  steps: 10\n")
    overrides = ["--svi.steps=20", "--svi.steps=30", "--guide.gating=ungated", "--prior.pi=0.2"]
    cfg = load_config(path, overrides)
    assert cfg.svi.steps == 30
    assert cfg.guide.gating == "ungated"
    # the default prior is edited, not replaced
    assert cfg.prior == PriorSpec(pi=0.2)
    with pytest.raises(ConfigError, match=r"^svi\.stepz: unknown key; allowed: steps"):
        load_config(path, ["--svi.stepz=3"])
    with pytest.raises(ConfigError, match=r"^svi\.steps: expected int, got str 'x'"):
        load_config(path, ["--svi.steps=x"])
    with pytest.raises(ConfigError, match=r"^seed\.x: seed is a value \(0\), not a section"):
        load_config(write(tmp_path, "seed: 0\n", "s.yaml"), ["--seed.x=1"])


def test_extends_merges_sections_and_detects_cycles(tmp_path):
    write(tmp_path, "name: base\nsvi: {steps: 10, lr: 0.1}\nguide: {gating: ungated}\n", "base.yaml")
    child = write(tmp_path, "extends: base.yaml\nname: child\nsvi: {steps: 20}\n", "child.yaml")
    cfg = load_config(child)
    assert (cfg.name, cfg.svi.steps, cfg.svi.lr, cfg.guide.gating) == ("child", 20, 0.1, "ungated")
    write(tmp_path, "extends: b.yaml\n", "a.yaml")
    write(tmp_path, "extends: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="'extends' cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(write(tmp_path, "extends: missing.yaml\n", "m.yaml"))


def test_variants_resolve_to_changed_settings():
    cfg = from_dict({
        "methods": ["vtvc", "pi_low", "layer_blocks"],
        "variants": {
            "pi_low": {"method": "vtvc", "set": {"prior.pi": 0.1, "svi.steps": 7}},
            "layer_blocks": {"method": "vtvc", "set": {"blocks": "layer"}},
        },
    })
    low = variant_config(cfg, "pi_low")
    assert low.prior.pi == 0.1 and low.prior.slab == NormalSpec(0.0, 1.0)
    assert low.svi.steps == 7 and cfg.svi.steps == 300
    assert variant_config(cfg, "layer_blocks").blocks == "layer"
    assert variant_config(cfg, "vtvc") is cfg


def test_yaml_round_trip_and_digest(tmp_path):
    cfg = from_dict({"name": "x", "svi": {"lr": 1, "steps": 5}, "blocks": ["conv1", "transformer.*"]})
    assert cfg.svi.lr == 1.0 and isinstance(cfg.svi.lr, float)
    again = from_dict(parse_yaml(to_yaml(cfg)))
    assert again == cfg
    assert digest(again) == digest(cfg)
    same = from_dict({"name": "x", "svi": {"lr": 1.0, "steps": 5}, "blocks": ["conv1", "transformer.*"]})
    assert digest(same) == digest(cfg)
    assert digest(from_dict({"name": "x", "svi": {"lr": 1.0, "steps": 6}})) != digest(cfg)


def test_configs_are_frozen():
    cfg = ExperimentConfig()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.seed = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.svi.steps = 3  # type: ignore[misc]


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    for method in cfg.methods:
        variant_config(cfg, method)


def test_shipped_configs_cover_the_brief():
    names = {p.stem for p in CONFIG_DIR.glob("*.yaml")}
    assert {"quickstart", "smoke"} <= names
    assert load_config(CONFIG_DIR / "quickstart.yaml").methods == METHODS


def test_one_default_per_knob_the_library_s():
    cfg = from_dict({})
    assert cfg.guide == GuideConfig() and cfg.prior == PriorSpec()
    library = dataclasses.asdict(SVIConfig())
    assert {k: v for k, v in dataclasses.asdict(cfg.svi).items() if k not in ("seed", "progress")} == {
        k: v for k, v in library.items() if k not in ("seed", "progress")}
    assert (cfg.baselines.steps, cfg.baselines.lr, cfg.baselines.batch_size) == (300, 5e-3, 64)
    run_svi = from_dict({"seed": 7, "eval": {"batch_size": 32}}).svi_config(progress=False)
    assert (run_svi.seed, run_svi.feature_batch_size, run_svi.progress) == (7, 32, False)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("svi:\n  steps: 3\n  steps: 4\n", "duplicate key 'steps'"),
        ("name: a\nname: b\n", "duplicate key 'name'"),
        ("zoo:\n  preset: null\n  finetuned:\n    mnist: a.pt\n    mnist: b.pt\n", "duplicate key 'mnist'"),
    ],
)
def test_duplicate_yaml_keys_are_refused_by_name(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_the_resolved_config_reads_back_as_the_same_config(tmp_path):
    override = "--prior.overrides=[{tasks: mnist, pi_prior: {a: 2, b: 1}}]"
    cfg = load_config(CONFIG_DIR / "quickstart.yaml", [override])
    again = load_config(write(tmp_path, to_yaml(cfg)))
    assert again == cfg and digest(again) == digest(cfg)
    assert again.prior.overrides[0].pi_prior.a == 2


def test_bank_rank_and_energy_are_exclusive_and_validated():
    SMOKE = CONFIG_DIR / "smoke.yaml"
    assert load_config(SMOKE, ["--bank_rank=4"]).bank_rank == 4
    cases = ((["--bank_rank=4", "--bank_energy=0.9"], "bank_energy"), (["--bank_rank=0"], "bank_rank"),
             (["--bank_energy=1.5"], "bank_energy"))
    for bad, key in cases:
        with pytest.raises(ConfigError, match=f"^{key}"):
            load_config(SMOKE, bad)
