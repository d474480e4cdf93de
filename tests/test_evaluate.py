"""Metrics against hand-worked examples and closed forms; tables and coefficient selection."""

import math

import pandas as pd
import pytest
import torch
from torch.utils.data import TensorDataset

from vtvc_pyro.evaluate import (
    ALPHA_GRID,
    TaskMetrics,
    accuracy,
    evaluate_encoder,
    expected_calibration_error,
    metrics_from_logits,
    metrics_from_probs,
    negative_log_likelihood,
    normalized_accuracy,
    results_table,
    save_table,
    select_alpha,
    table_to_markdown,
)
from vtvc_pyro.heads import ClassificationHead, HeadBank


def test_ece_hand_worked_15_bins():
    # confidences 0.9 and 0.88 share bin (13/15, 14/15]; 0.75, 0.7 and 0.55 sit alone in their bins.
    probs = torch.tensor([[0.9, 0.1], [0.88, 0.12], [0.25, 0.75], [0.3, 0.7], [0.55, 0.45]],
                         dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 0])
    # bin of 0.9/0.88: accuracy 1/2, confidence 0.89 -> 2/5 * 0.39; 0.75 wrong; 0.7 right; 0.55 right
    expected = 2 / 5 * 0.39 + 1 / 5 * 0.75 + 1 / 5 * 0.3 + 1 / 5 * 0.45
    assert expected_calibration_error(probs, labels) == pytest.approx(expected, abs=1e-12)


def test_ece_uses_fifteen_bins_not_ten():
    # 0.62 and 0.68 fall in different 15-bins, but in the same 10-bin (0.6, 0.7].
    probs = torch.tensor([[0.62, 0.38], [0.68, 0.32]])
    labels = torch.tensor([0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.5 * 0.38 + 0.5 * 0.68)
    assert expected_calibration_error(probs, labels, num_bins=10) == pytest.approx(abs(0.5 - 0.65))


def test_ece_zero_for_perfect_calibration():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(probs, torch.tensor([0, 1])) == 0.0


def test_nll_closed_form():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2])
    expected = (math.log(1 + 2 * math.exp(-2)) + math.log(3)) / 2
    assert metrics_from_logits(logits, labels).nll == pytest.approx(expected, rel=1e-12)
    assert negative_log_likelihood(logits.double().softmax(-1), labels) == pytest.approx(expected, rel=1e-12)


def test_nll_from_logits_is_exact_for_confident_mistakes():
    # p(label) = e^-1000 underflows as a probability; the logit path still gives 1000 nats
    metrics = metrics_from_logits(torch.tensor([[1000.0, 0.0]]), torch.tensor([1]))
    assert metrics.nll == pytest.approx(1000.0)
    assert metrics.accuracy == 0.0


def test_accuracy_and_metrics_from_probs():
    probs = torch.tensor([[0.6, 0.4], [0.2, 0.8], [0.7, 0.3], [0.1, 0.9]])
    labels = torch.tensor([0, 1, 1, 0])
    assert accuracy(probs, labels) == 0.5
    m = metrics_from_probs(probs, labels)
    assert m.n == 4
    assert m.nll == pytest.approx(-(math.log(0.6) + math.log(0.8) + math.log(0.3) + math.log(0.1)) / 4)


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match=r"\[3\]"):
        accuracy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must lie in"):
        accuracy(torch.zeros(2, 3), torch.tensor([0, 3]))


def test_evaluate_encoder_scores_each_task_with_its_own_head():
    # 2-d features = the first two pixels; head "a" reads axis 0 vs axis 1, head "b" the reverse order
    eye = torch.eye(2)
    heads = HeadBank({"a": ClassificationHead(eye, 10.0, ["x", "y"]),
                      "b": ClassificationHead(eye.flip(0), 10.0, ["y", "x"])})
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]]).view(3, 1, 1, 2)
    splits = {"a": TensorDataset(images, torch.tensor([0, 1, 1])),   # 2 of 3 right
              "b": TensorDataset(images, torch.tensor([1, 0, 1]))}   # 3 of 3 right
    seen = []

    def encode(x, task_ids):
        seen.append(task_ids.unique().tolist())
        return x.flatten(1)

    out = evaluate_encoder(encode, heads, splits, batch_size=2)
    assert out["a"].accuracy == pytest.approx(2 / 3)
    assert out["b"].accuracy == 1.0
    assert out["a"].n == 3
    assert seen == [[0], [0], [1], [1]]


def test_evaluate_encoder_unknown_task():
    heads = HeadBank({"a": ClassificationHead(torch.eye(2), 1.0, ["x", "y"])})
    with pytest.raises(KeyError, match="'zz'"):
        evaluate_encoder(lambda x, t: x, heads, {"zz": TensorDataset(torch.zeros(1, 2), torch.zeros(1))})


def test_normalized_accuracy():
    assert normalized_accuracy({"a": 0.45, "b": TaskMetrics(0.5, 1.0, 0.1, 10)}, {"a": 0.9, "b": 1.0}) == {
        "a": pytest.approx(0.5), "b": pytest.approx(0.5)}
    with pytest.raises(KeyError, match="'b'"):
        normalized_accuracy({"b": 0.5}, {"a": 0.9})


def test_select_alpha_maximises_mean_normalised_accuracy_first_on_ties():
    def at(alpha):  # task "a" peaks at 0.35; task "b" is flat from 0.35 on
        return {"a": TaskMetrics(1.0 - abs(alpha - 0.35), 0.0, 0.0, 1),
                "b": TaskMetrics(min(alpha, 0.35), 0.0, 0.0, 1)}

    chosen = select_alpha(at, {"a": 1.0, "b": 0.5})
    assert chosen.alpha == 0.35
    assert chosen.score == pytest.approx((1.0 + 0.7) / 2)
    assert len(chosen.scores) == len(ALPHA_GRID) == 21
    flat = select_alpha(lambda a: {"a": TaskMetrics(0.5, 0.0, 0.0, 1)}, {"a": 1.0})
    assert flat.alpha == 0.0


def test_results_table_columns_and_means(tmp_path):
    ft = {"a": TaskMetrics(0.8, 0.5, 0.1, 10), "b": TaskMetrics(0.5, 1.0, 0.2, 10)}
    zs = {"a": TaskMetrics(0.4, 1.5, 0.3, 10), "b": TaskMetrics(0.5, 2.5, 0.1, 10)}
    table = results_table({"zeroshot": zs, "finetuned": ft}, ft)
    assert list(table.columns) == ["a acc", "a norm", "b acc", "b norm", "mean acc", "mean norm",
                                   "mean nll", "mean ece"]
    assert table.loc["zeroshot", "a norm"] == pytest.approx(50.0)
    assert table.loc["zeroshot", "mean acc"] == pytest.approx(45.0)
    assert table.loc["zeroshot", "mean norm"] == pytest.approx(75.0)
    assert table.loc["zeroshot", "mean nll"] == pytest.approx(2.0)
    assert table.loc["finetuned", "mean norm"] == pytest.approx(100.0)

    markdown = table_to_markdown(table)
    assert markdown.splitlines()[0].startswith("| method | a acc | a norm |")
    assert "| zeroshot | 40.0 | 50.0 | 50.0 | 100.0 | 45.0 | 75.0 | 2.000 | 0.200 |" in markdown
    save_table(table, tmp_path / "t.csv")
    save_table(table, tmp_path / "t.md")
    back = pd.read_csv(tmp_path / "t.csv", index_col="method")
    pd.testing.assert_frame_equal(back, table)
    assert (tmp_path / "t.md").read_text() == markdown + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.md"]  # no temp files left
    with pytest.raises(ValueError, match="t.txt"):
        save_table(table, tmp_path / "t.txt")
