"""Task negation (METHOD §8): the likelihood that asks a target task's samples to forget, and task
arithmetic's α rule for negation.

The forgetting likelihood keeps the ``obs`` site of any model (VTVC, aTLAS, the meta-network) and changes
what it scores: a control sample is scored by ``log p(label)`` as before, a target sample by the negated
cross-entropy to the uniform distribution over the target's ``C`` classes, ``(1/C) Σ_c log p_c``, which is
largest when the prediction is uniform. The swap is a Pyro messenger around the model, so ``model.py`` and
the baselines are used unchanged, and prediction (no labels) is untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger

from vtvc_pyro.model import Batch, FrozenNetworks

CONTROL_KEEP = 0.95
"""Task arithmetic keeps control accuracy on val at ≥ this share of the zero-shot control accuracy."""


def uniform_log_likelihood(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(1/C) Σ_{c<C} log softmax(logits)_c`` over the last axis: minus the cross-entropy from the uniform
    distribution over the first ``C = num_classes`` classes to the prediction."""
    if not 0 < num_classes <= logits.shape[-1]:
        raise ValueError(f"num_classes must lie in [1, {logits.shape[-1]}], got {num_classes}")
    log_probs = logits.log_softmax(-1)[..., :num_classes]
    return log_probs.clamp_min(torch.finfo(log_probs.dtype).min).mean(-1)


class ForgetCategorical(dist.Categorical):
    """``Categorical(logits)`` whose ``log_prob`` is the uniform log-likelihood over the first ``num_classes``
    classes where ``forget`` holds (the label is ignored there) and ``log p(label)`` elsewhere."""

    def __init__(self, logits: torch.Tensor, forget: torch.Tensor, num_classes: int,
                 validate_args: bool | None = None):
        super().__init__(logits=logits, validate_args=validate_args)
        self.forget = forget.expand(self.batch_shape)
        self.num_classes = num_classes

    def expand(self, batch_shape: Any, _instance: Any = None) -> ForgetCategorical:
        batch_shape = torch.Size(batch_shape)
        return ForgetCategorical(self.logits.expand(*batch_shape, -1), self.forget.expand(batch_shape),
                                 self.num_classes, validate_args=False)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        labelled = super().log_prob(value)
        return torch.where(self.forget, uniform_log_likelihood(self.logits, self.num_classes), labelled)


class _ForgetObs(Messenger):
    """Turns the observed ``obs`` site's ``Categorical`` into a :class:`ForgetCategorical`."""

    def __init__(self, forget: torch.Tensor, num_classes: int):
        super().__init__()
        self.forget, self.num_classes = forget, num_classes

    def _pyro_sample(self, msg: dict[str, Any]) -> None:
        if msg["name"] == "obs" and msg["is_observed"]:
            fn = msg["fn"]
            if not isinstance(fn, dist.Categorical):
                raise TypeError(f"site 'obs': the forgetting likelihood needs a Categorical, got "
                                f"{type(fn).__name__}")
            forget = self.forget.to(fn.logits.device).reshape(-1, *([1] * (len(fn.batch_shape) - 1)))
            msg["fn"] = ForgetCategorical(fn.logits, forget, self.num_classes)


class ForgetLikelihood:
    """``model`` fitted with the forgetting likelihood: samples whose task id is ``forget_task`` (a head
    index) are pushed toward the uniform distribution over its ``num_classes`` classes; the others keep their
    labels. Call it as the model in SVI; predict with ``model`` itself."""

    def __init__(self, model: Any, forget_task: int, num_classes: int):
        self.model, self.forget_task, self.num_classes = model, int(forget_task), int(num_classes)

    @property
    def frozen(self) -> FrozenNetworks:
        return self.model.frozen

    def __call__(self, batch: Batch, kl_scale: float = 1.0) -> torch.Tensor:
        with _ForgetObs(batch.task == self.forget_task, self.num_classes):
            return self.model(batch, kl_scale=kl_scale)


def select_negation_alpha(control_accuracy: Mapping[float, float], zeroshot_control: float,
                          keep: float = CONTROL_KEEP) -> float:
    """The largest α whose control accuracy (on val) is ≥ ``keep`` × the zero-shot control accuracy."""
    if not control_accuracy:
        raise ValueError("protocol.alpha_grid: empty; negation needs at least one α")
    allowed = [a for a, acc in control_accuracy.items() if acc >= keep * zeroshot_control]
    if not allowed:
        raise ValueError(f"protocol.alpha_grid: no α in {sorted(control_accuracy)} keeps control accuracy "
                         f"≥ {keep:g} × zero-shot ({zeroshot_control:.4f}); include 0 in the grid")
    return max(allowed)
