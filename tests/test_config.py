"""Experiment configs: schema validation, dotted overrides, ``extends``, variants, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from vtvc_pyro.experiment.config import (
    ALPHA_GRID,
    METHODS,
    ExperimentConfig,
    digest,
    from_dict,
    load_config,
    to_yaml,
    variant_config,
)
from vtvc_pyro.experiment.typed_config import ConfigError, parse_override, parse_yaml

CONFIG_DIR = Path(__file__).resolve().parents[1] / "experiments" / "configs"


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_follow_the_method_page():
    cfg = from_dict({})
    assert cfg.methods == METHODS
    assert cfg.prior == {"kind": "spike_and_slab", "pi": 0.5, "slab": {"loc": 0.0, "scale": 1.0}}
    assert cfg.protocol.alpha_grid[0] == 0.0 and cfg.protocol.alpha_grid[-1] == 1.0
    assert len(ALPHA_GRID) == 21 and ALPHA_GRID[7] == pytest.approx(0.35)
    assert (cfg.guide.tau0, cfg.guide.beta, cfg.guide.sharpness) == (0.05, 1.0, 20.0)
    assert cfg.eval.ece_bins == 15


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"svi": {"stepz": 3}}, "svi.stepz: unknown key; allowed: steps, lr, batch_size"),
        ({"zoo": {"presett": "micro"}}, "zoo.presett: unknown key; allowed: preset, cache_dir"),
        ({"colour": 1}, "colour: unknown key; allowed: name, seed"),
        ({"svi": {"steps": "many"}}, "svi.steps: expected int, got str 'many'"),
        ({"svi": {"steps": True}}, "svi.steps: expected int, got bool"),
        ({"svi": {"steps": 2.5}}, "svi.steps: expected int, got float"),
        ({"svi": {"lr": "fast"}}, "svi.lr: expected float"),
        ({"svi": {"lr": 0}}, "svi.lr: must be > 0"),
        ({"svi": {"elbo": "renyi"}}, "svi.elbo: must be one of meanfield, trace"),
        ({"svi": 3}, "svi: expected a mapping"),
        ({"zoo": {"tasks": "mnist"}}, "zoo.tasks: expected list of str"),
        ({"zoo": {"tasks": ["mnist", 3]}}, "zoo.tasks[1]: expected str"),
        ({"zoo": {"finetuned": {"mnist": 1}}}, "zoo.finetuned.mnist: expected str"),
        ({"protocol": {"ties_top_k": 1.5}}, "protocol.ties_top_k: must be in (0, 1]"),
        ({"protocol": {"name": "negation"}}, "protocol.name: must be one of task_addition, knowledge"),
        ({"protocol": {"alpha_grid": []}}, "protocol.alpha_grid: must not be empty"),
        ({"methods": ["vtvc", "bayes"]}, "methods[1]: unknown method 'bayes'"),
        ({"methods": ["vtvc", "vtvc"]}, "methods[1]: 'vtvc' is listed twice"),
        ({"methods": ["vtvc_merged"]}, "methods: vtvc_merged merges the posterior of vtvc"),
        ({"blocks": "rows"}, "blocks: must be tensor, layer or a list"),
        ({"prior": {"pi": 0.2}}, "prior.kind: required"),
        ({"zoo": {"preset": None, "model": "ViT-B-32"}}, "zoo.pretrained: required when zoo.preset is null"),
        ({"zoo": {"pretrained": "/x.pt"}}, "zoo.pretrained: only for real checkpoints"),
        ({"variants": {"v": {"set": {}}}}, "variants.v.method: required key is missing"),
        ({"variants": {"v": {"method": "zeroshot"}}}, "variants.v.method: must be one of task_arithmetic"),
        ({"variants": {"vtvc": {"method": "vtvc"}}}, "variants.vtvc: a variant cannot take a built-in"),
        ({"variants": {"v": {"method": "vtvc", "set": {"seed": 3}}}}, "variants.v.set.seed: a variant may"),
        ({"variants": {"v": {"method": "vtvc", "set": {"svi.stepz": 3}}}}, "variants.v.set: svi.stepz: unkn"),
        ({"variants": {"a.b": {"method": "vtvc"}}}, "variants.a.b: a variant name may hold letters"),
        ({"threads": 0}, "threads: must be > 0 or null"),
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
    assert cfg.prior == {"kind": "spike_and_slab", "pi": 0.2, "slab": {"loc": 0.0, "scale": 1.0}}
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
    assert low.prior["pi"] == 0.1 and low.prior["slab"] == {"loc": 0.0, "scale": 1.0}
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
    with pytest.raises(AttributeError):
        cfg.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    for method in cfg.methods:
        variant_config(cfg, method)


def test_shipped_configs_cover_the_brief():
    names = {p.stem for p in CONFIG_DIR.glob("*.yaml")}
    assert {"quickstart", "smoke"} <= names
    assert load_config(CONFIG_DIR / "quickstart.yaml").methods == METHODS
