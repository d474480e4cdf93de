"""End to end on the embedded micro zoo: one SVI fit of the gated VTVC (default prior, guide and SVI settings;
composed open_clip tower, the zoo's task vectors and heads), fitted on the union of the val splits, beats
task arithmetic on test. Slow: run with ``make test-slow``."""

import time

import pytest
import torch

from vtvc_pyro.compose import ComposedEncoder
from vtvc_pyro.data import MultiTaskDataset
from vtvc_pyro.evaluate import evaluate_encoder
from vtvc_pyro.guide import AmortizedGuide
from vtvc_pyro.inference import SVIConfig, fit_svi, pretrained_features
from vtvc_pyro.merge import task_arithmetic
from vtvc_pyro.model import VTVCModel
from vtvc_pyro.posterior import Posterior


def mean_accuracy(metrics) -> float:
    return sum(m.accuracy for m in metrics.values()) / len(metrics)


@pytest.mark.slow
def test_gated_vtvc_beats_task_arithmetic_on_the_micro_zoo(micro_zoo):
    zoo, bank = micro_zoo, micro_zoo.bank()
    visual = zoo.create_model().visual.eval()
    encoder = ComposedEncoder(visual, bank)
    test = {t: zoo.split(t, "test") for t in zoo.task_names}
    fit_data = MultiTaskDataset({t: zoo.split(t, "val") for t in zoo.task_names}, zoo.task_names)

    torch.manual_seed(0)
    model = VTVCModel(encoder, zoo.heads, None, bank.task_names, bank.block_names)
    features0 = pretrained_features(model.frozen, fit_data)
    guide = AmortizedGuide(features0.shape[1], bank.task_names, bank.block_names)
    config = SVIConfig(progress=False)
    start = time.perf_counter()
    fit = fit_svi(model, guide, fit_data, config, features0=features0)
    seconds = time.perf_counter() - start

    def encode(images, task):
        return encoder(images, guide.point_coef(model.frozen.features0(images)))

    vtvc = evaluate_encoder(encode, zoo.heads, test)
    sparsity = 1 - Posterior(model, guide).summarize(fit_data, features0)["gate"].mean().item()
    ta_chosen = sum(zoo.accuracy("task_arithmetic", "test").values()) / len(zoo.task_names)

    def ta_at(alpha):
        visual.load_state_dict(task_arithmetic(bank, alpha))
        return mean_accuracy(evaluate_encoder(lambda images, _: visual(images), zoo.heads, test))

    ta_oracle = max((ta_at(round(0.05 * i, 2)), round(0.05 * i, 2)) for i in range(21))
    print(f"\nmicro zoo, mean test accuracy: gated VTVC {100 * mean_accuracy(vtvc):.2f} "
          f"({ {t: round(100 * m.accuracy, 1) for t, m in vtvc.items()} }, sparsity {sparsity:.3f}); "
          f"task arithmetic {100 * ta_chosen:.2f} (α chosen on val), best α on test {ta_oracle[1]}: "
          f"{100 * ta_oracle[0]:.2f}; {config.steps} SVI steps on {len(fit_data)} samples in "
          f"{seconds:.1f} s, final tempered ELBO per datum {fit.tempered_elbo[-1]:.3f}")
    assert mean_accuracy(vtvc) > ta_chosen
