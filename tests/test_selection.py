"""Held-out selection of ``kl_weight`` and multi-seed runs: the config keys, the seeded split of the fit data
(never test), the chosen value and every candidate's held-out score in the run directory, mean ± sd over
seeds in the tables and in ``vtvc report``."""

from __future__ import annotations

import json
import math
import re
import statistics

import pytest
from test_experiment import SMOKE

from vtvc_pyro import cli
from vtvc_pyro.experiment.config import ConfigError, from_dict
from vtvc_pyro.experiment.methods import heldout_split
from vtvc_pyro.experiment.problem import Problem
from vtvc_pyro.experiment.report import summarize, to_markdown


@pytest.mark.parametrize(("raw", "message"), [
    ({"seeds": []}, "seeds: must name at least one seed"),
    ({"seeds": [0, 2, 0]}, "seeds: seed 0 is listed twice"),
    ({"seeds": [-1]}, r"seeds\[0\]: input should be greater than or equal to 0"),
    ({"selection": {"kl_weights": [0.01, 0.0]}},
     r"selection.kl_weights\[1\]: input should be greater than 0"),
    ({"selection": {"kl_weights": [0.01, 0.01]}}, "selection.kl_weights: 0.01 is listed twice"),
    ({"selection": {"heldout": 1.0}}, "selection.heldout: input should be less than 1"),
])
def test_bad_seeds_and_selection_settings_are_refused_naming_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


def test_fit_seeds_default_to_the_run_seed():
    assert from_dict({"seed": 3}).fit_seeds == (3,)
    assert from_dict({"seed": 3, "seeds": [0, 1, 2]}).fit_seeds == (0, 1, 2)


class _Items:
    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int):
        return i, None


def test_heldout_split_holds_out_a_seeded_share_of_every_task():
    problem = Problem("all", ["a", "b"], None, None, {"a": _Items(10), "b": _Items(25)}, {}, {})
    keep, held = heldout_split(problem, 0.2, seed=0)
    task = problem.joined("fit").task_ids
    assert sorted(keep + held) == list(range(35)) and not set(keep) & set(held)
    assert [int((task[held] == k).sum()) for k in (0, 1)] == [2, 5]  # round(0.2 · 10), round(0.2 · 25)
    assert heldout_split(problem, 0.2, seed=0) == (keep, held)
    assert heldout_split(problem, 0.2, seed=1)[1] != held


def test_summary_rows_carry_the_standard_deviation_over_seeds():
    def result(acc_a, acc_b, sparsity):
        return {"tasks": {"a": {"accuracy": acc_a, "nll": 1.0, "ece": 0.1, "n": 10},
                          "b": {"accuracy": acc_b, "nll": 2.0, "ece": 0.2, "n": 10}}, "sparsity": sparsity}

    seeds = {"0": result(0.5, 0.7, 0.6), "1": result(0.6, 0.7, 0.8), "2": result(0.7, 0.9, 0.7)}
    combined = {**result(0.6, 0.7666666666666666, 0.7), "seeds": seeds}
    rows = summarize({"vtvc": combined}, ["a", "b"], {"a": 0.8, "b": 1.0})
    row = rows["vtvc"]
    # mean accuracy per seed: 0.6, 0.65, 0.8; normalised: (0.5/0.8 + 0.7)/2 = 0.6625, 0.725, 0.8875
    assert row["seeds"] == 3
    assert row["mean_accuracy"] == pytest.approx(statistics.mean([0.6, 0.65, 0.8]))
    assert row["sd"]["mean_accuracy"] == pytest.approx(statistics.stdev([0.6, 0.65, 0.8]))
    assert row["sd"]["mean_normalized_accuracy"] == pytest.approx(statistics.stdev([0.6625, 0.725, 0.8875]))
    assert row["sd"]["sparsity"] == pytest.approx(0.1)
    assert row["sd"]["nll"] == 0.0
    line = next(line for line in to_markdown(rows, ["a", "b"]).splitlines() if line.startswith("| vtvc"))
    assert "vtvc (3 seeds)" in line and "68.3 ± 10.4" in line


def test_a_run_with_seeds_and_selection_keeps_every_seed_and_every_candidate(micro_zoo, tmp_path, capsys):
    out = tmp_path / "run"
    cli.main(["--quiet", "run", str(SMOKE), "--out", str(out), "--seeds=[0, 1]",
              "--methods=[finetuned, atlas, vtvc, vtvc_merged]", "--selection.kl_weights=[0.001, 0.1]",
              "--svi.steps=4", "--baselines.steps=2"])
    metrics = json.loads((out / "metrics.json").read_text())["methods"]
    for method in ("atlas", "vtvc", "vtvc_merged"):
        row = metrics[method]
        assert row["seeds"] == 2 and sorted(row["per_seed"]) == ["0", "1"]
        each = [statistics.mean(m["accuracy"] for m in s["tasks"].values()) for s in row["per_seed"].values()]
        assert row["mean_accuracy"] == pytest.approx(statistics.mean(each))
        assert row["sd"]["mean_accuracy"] == pytest.approx(statistics.stdev(each))
    for seed in ("0", "1"):
        selection = metrics["vtvc"]["per_seed"][seed]["details"]["all"]["selection"]
        scores = selection["scores"]
        assert sorted(scores) == ["0.001", "0.1"] and selection["heldout"] == 0.2
        best = max(scores, key=lambda w: (scores[w]["mean_normalized_accuracy"], -scores[w]["nll"]))
        assert selection["kl_weight"] == float(best)
        assert metrics["vtvc"]["per_seed"][seed]["details"]["all"]["kl_weight"] == float(best)
        assert all(math.isfinite(s["nll"]) for s in scores.values())
    assert (out / "posteriors" / "vtvc" / "all" / "seed-1" / "task_coef.safetensors").is_file()
    capsys.readouterr()
    cli.main(["report", str(out), "--markdown"])
    table = capsys.readouterr().out
    assert "| vtvc (2 seeds) |" in table and " ± " in table


def test_repeated_splits_average_what_each_split_alone_scores(micro_zoo, tmp_path):
    def selection(name, *overrides):
        cli.main(["--quiet", "run", str(SMOKE), "--out", str(tmp_path / name),
                  "--methods=[finetuned, vtvc]", "--selection.kl_weights=[0.001, 0.1]", "--svi.steps=2",
                  *overrides])
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())["methods"]
        return metrics["vtvc"]["details"]["all"]["selection"]

    both = selection("both", "--selection.repeats=2", "--selection.split_seed=3")
    alone = [selection("split3", "--selection.split_seed=3"), selection("split4", "--selection.split_seed=4")]
    assert both["repeats"] == 2
    for weight, score in both["scores"].items():
        assert score["per_split"] == [{k: v for k, v in a["scores"][weight].items() if k != "per_split"}
                                      for a in alone]
        for key in ("mean_normalized_accuracy", "mean_accuracy", "nll"):
            assert score[key] == pytest.approx(statistics.mean(a["scores"][weight][key] for a in alone))
    scores = both["scores"]
    best = max(scores, key=lambda w: (scores[w]["mean_normalized_accuracy"], -scores[w]["nll"]))
    assert both["kl_weight"] == float(best)


def test_candidates_fitted_side_by_side_score_what_they_score_one_after_the_other(micro_zoo, tmp_path):
    def run(name, workers):
        cli.main(["--quiet", "run", str(SMOKE), "--out", str(tmp_path / name), f"--workers={workers}",
                  "--methods=[finetuned, vtvc]", "--selection.kl_weights=[0.001, 0.1]",
                  "--selection.repeats=2", "--svi.steps=3"])
        return json.loads((tmp_path / name / "metrics.json").read_text())["methods"]["vtvc"]

    alone, side_by_side = run("one", 1), run("two", 2)
    assert side_by_side["details"]["all"]["selection"] == alone["details"]["all"]["selection"]
    assert side_by_side["tasks"] == alone["tasks"]  # and the refit on all fit data after it


def test_the_readme_tables_are_the_reports_of_the_committed_run_summaries(capsys):
    root = SMOKE.parents[2]
    readme = (root / "README.md").read_text()
    blocks = re.findall(r"<!-- vtvc report (\S+) --markdown -->\n(.*?)<!-- end of report -->", readme, re.S)
    assert {summary for summary, _ in blocks} == {"experiments/results/quickstart.json",
                                                  "experiments/results/quickstart-3seeds.json",
                                                  "experiments/results/long-3seeds.json",
                                                  "experiments/results/selection-repeats2-3seeds.json"}
    for summary, block in blocks:
        cli.main(["report", str(root / summary), "--markdown"])
        report = capsys.readouterr().out
        assert block.strip() == report.split("\n", 2)[2].strip(), summary  # the report without its title
