"""The `vtvc` command line: config and override errors are reported by key, with exit status 2, before
anything is loaded or written; `config show/check`, `show`, `plot`, `--version`, `--quiet`, help texts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import vtvc_pyro
from vtvc_pyro import cli
from vtvc_pyro.guide import GuideConfig

SMOKE = str(Path(__file__).resolve().parents[1] / "experiments" / "configs" / "smoke.yaml")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--svi.stepz=3"], "error: svi.stepz: unknown key; allowed: steps, batch_size, lr"),
        (["--svi.steps=many"], "error: svi.steps: expected int, got str 'many'"),
        (["--svi.kl_weight=0"], "error: svi.kl_weight: must be > 0 and finite, got 0"),
        (["--svi.lr=.inf"], "error: svi.lr: must be > 0 and finite, got inf"),
        (["--seed=-1"], "error: seed: input should be greater than or equal to 0; got -1"),
        (["--zoo.tasks=[]"], "error: zoo.tasks: must name at least one task"),
        (["--protocol.alpha_grid=[.nan]"], "error: protocol.alpha_grid[0]: input should be"),
        (["--svi.steps"], "error: svi.steps: override '--svi.steps' has no value"),
        (["svi.steps=3"], "error: override 'svi.steps=3': expected --key.sub=value"),
        (["--guide.gating=sometimes"], "error: guide.gating: 'sometimes' is not a gating mode"),
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

    def fake_run(config_path, overrides, out, force, progress, quiet, report_to):
        seen.update(config=config_path, overrides=overrides, out=out, force=force, progress=progress,
                    quiet=quiet, report_to=report_to)

    monkeypatch.setattr("vtvc_pyro.experiment.run_experiment", fake_run)
    cli.main(["--quiet", "run", SMOKE, "--svi.steps=3", "--out", "x", "--prior.pi=0.2", "--force"])
    overrides = ["--svi.steps=3", "--prior.pi=0.2"]
    assert seen == {"config": SMOKE, "overrides": overrides, "out": "x", "force": True, "progress": False,
                    "quiet": True, "report_to": []}


def test_missing_checkpoint_files_are_named_before_anything_is_written(tmp_path, capsys):
    config = Path(SMOKE).with_name("vit_b32_task_addition.yaml")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        cli.main(["run", str(config), "--out", str(out), f"--zoo.pretrained={tmp_path / 'zeroshot.pt'}"])
    assert info.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith(f"error: zoo.pretrained: file not found: {tmp_path / 'zeroshot.pt'}")
    assert not out.exists()


def test_config_show_prints_the_resolved_config_and_check_validates(capsys, tmp_path):
    cli.main(["config", "show", SMOKE, "--prior.pi=0.2"])
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["prior"]["pi"] == 0.2 and shown["svi"]["kl_weight"] == 0.001
    assert shown["guide"]["tau0"] == GuideConfig().tau0  # a default filled in from the library
    cli.main(["config", "check", SMOKE])
    assert capsys.readouterr().out.startswith(f"{SMOKE}: valid (10 methods")
    with pytest.raises(SystemExit) as info:
        cli.main(["config", "check", SMOKE, "--svi.kl_weight=0"])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("error: svi.kl_weight: must be > 0 and finite")


def test_duplicate_tasks_on_the_command_line_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bank", "build", "--pretrained", "p", "--finetuned", "a=x", "a=y",
                  "--out", str(tmp_path / "b")])
    assert info.value.code == 2
    assert capsys.readouterr().err.startswith("error: --finetuned: task 'a' is given twice")


def test_version_and_help_with_an_example_for_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"vtvc_pyro {vtvc_pyro.__version__}"
    commands = [["convert"], ["bank", "build"], ["zoo", "build"], ["run"], ["config", "show"],
                ["config", "check"], ["plot"], ["show"]]
    for command in commands:
        with pytest.raises(SystemExit):
            cli.main([*command, "--help"])
        text = capsys.readouterr().out
        assert "example:\n  vtvc " + " ".join(command) in text, command
        assert text.count("  --") >= 1 or command in (["plot"], ["show"]), command


def test_show_and_plot_need_a_finished_run(tmp_path, capsys):
    for command in ("show", "plot"):
        with pytest.raises(SystemExit) as info:
            cli.main([command, str(tmp_path)])
        assert info.value.code == 2
        assert "metrics.json: not found" in capsys.readouterr().err
