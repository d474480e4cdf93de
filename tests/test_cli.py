"""`vtvc run` on the command line: config and override errors are reported by key, with exit status 2,
before anything is loaded or written."""

from __future__ import annotations

from pathlib import Path

import pytest

from vtvc_pyro import cli

SMOKE = str(Path(__file__).resolve().parents[1] / "experiments" / "configs" / "smoke.yaml")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--svi.stepz=3"], "error: svi.stepz: unknown key; allowed: steps, lr, batch_size"),
        (["--svi.steps=many"], "error: svi.steps: expected int, got str 'many'"),
        (["--svi.steps"], "error: svi.steps: override '--svi.steps' has no value"),
        (["svi.steps=3"], "error: override 'svi.steps=3': expected --key.sub=value"),
        (["--guide.gating=sometimes"], "error: guide.gating: must be one of gated, ungated"),
        (["--methods=[vtvc, lasso]"], "error: methods[1]: unknown method 'lasso'"),
        (["--prior.pi=1.5"], "error: prior.pi: 1.5 is outside (0.0, 1.0)"),
        (["--prior.slab.width=2"], "error: prior.slab.width: unknown field; allowed: loc, scale"),
    ],
)
def test_bad_configs_exit_with_the_key_named(args, message, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        cli.main(["run", SMOKE, *args, "--out", str(out)])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith(message)
    assert not out.exists()


def test_a_missing_config_file_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["run", str(tmp_path / "nope.yaml")])
    assert info.value.code == 2
    assert f"config file not found: {tmp_path / 'nope.yaml'}" in capsys.readouterr().err


def test_overrides_before_and_after_options_are_collected(monkeypatch):
    seen = {}

    def fake_run(config_path, overrides, out, force):
        seen.update(config=config_path, overrides=overrides, out=out, force=force)

    monkeypatch.setattr("vtvc_pyro.experiment.run_experiment", fake_run)
    cli.main(["run", SMOKE, "--svi.steps=3", "--out", "x", "--prior.pi=0.2", "--force"])
    overrides = ["--svi.steps=3", "--prior.pi=0.2"]
    assert seen == {"config": SMOKE, "overrides": overrides, "out": "x", "force": True}


def test_missing_checkpoint_files_are_named_before_anything_is_written(tmp_path, capsys):
    config = Path(SMOKE).with_name("vit_b32_task_addition.yaml")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        cli.main(["run", str(config), "--out", str(out), f"--zoo.pretrained={tmp_path / 'zeroshot.pt'}"])
    assert info.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith(f"error: zoo.pretrained: file not found: {tmp_path / 'zeroshot.pt'}")
    assert not out.exists()
