"""Frozen classification heads: CLIP zero-shot heads built from class-name prompts by the text tower."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vtvc_pyro.io import atomic_path


class ClassificationHead:
    """``logits = logit_scale · normalize(features) @ weightᵀ`` with L2-normalised class rows.

    Plain tensors, not an ``nn.Module``: a head is frozen and must never reach an optimizer.
    """

    def __init__(self, weight: torch.Tensor, logit_scale: float, class_names: Sequence[str]):
        if weight.ndim != 2:
            raise ValueError(f"head weight must be [num_classes, dim], got shape {tuple(weight.shape)}")
        if len(class_names) != weight.shape[0]:
            raise ValueError(
                f"head has {weight.shape[0]} rows but {len(class_names)} class names were given"
            )
        if not torch.isfinite(weight).all():
            raise ValueError("head weight contains non-finite values")
        self.weight = F.normalize(weight.detach().float(), dim=-1)
        self.logit_scale = float(logit_scale)
        self.class_names = list(class_names)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * F.normalize(features, dim=-1) @ self.weight.to(features).T

    @classmethod
    @torch.no_grad()
    def from_text_tower(
        cls,
        clip_model: torch.nn.Module,
        tokenizer: Callable,
        class_names: Sequence[str],
        templates: Sequence[str | Callable[[str], str]],
        logit_scale: float | None = None,
    ) -> ClassificationHead:
        """The zero-shot head of real CLIP: open_clip's classifier builder over prompt templates.

        ``logit_scale`` defaults to the model's own ``exp(logit_scale)`` (100 for released CLIPs).
        """
        from open_clip.zero_shot_classifier import build_zero_shot_classifier

        device = next(clip_model.parameters()).device
        was_training = clip_model.training
        clip_model.eval()
        weight = build_zero_shot_classifier(
            clip_model, tokenizer, class_names, templates, num_classes_per_batch=10, device=device
        )  # [D, C]
        clip_model.train(was_training)
        if logit_scale is None:
            logit_scale = float(clip_model.logit_scale.exp())
        return cls(weight.T.cpu(), logit_scale, class_names)

    @classmethod
    def from_papers(cls, weight: torch.Tensor | None, bias: torch.Tensor | None, normalize: object,
                    class_names: Sequence[str], source: str = "head") -> ClassificationHead:
        """The task-arithmetic papers' head: an ``nn.Linear`` on L2-normalised features whose rows are the
        class embeddings times ``exp(logit_scale)``. Exact as ours only if the features are normalised, the
        bias is zero and all rows share one norm (that norm is the logit scale); anything else is refused."""
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise ValueError(f"{source}: the head has no [num_classes, dim] weight")
        if normalize is not True:
            raise ValueError(f"{source}: the head has normalize={normalize!r}; only heads that normalise the "
                             "features give logit_scale · cosine logits")
        if bias is not None and bool(bias.ne(0).any()):
            raise ValueError(f"{source}: the head has a non-zero bias; scale · cosine logits have none")
        norms = weight.detach().double().norm(dim=1)
        scale = float(norms.mean())
        if not scale > 0 or float((norms - scale).abs().max()) > 1e-4 * scale:
            raise ValueError(f"{source}: the head's rows have different norms ({float(norms.min()):.6g} to "
                             f"{float(norms.max()):.6g}); zero-shot heads share one (the logit scale)")
        return cls(weight, scale, class_names)

    def save(self, path: str | os.PathLike) -> None:
        meta = {"class_names": json.dumps(self.class_names), "logit_scale": repr(self.logit_scale)}
        with atomic_path(path) as tmp:
            save_file({"weight": self.weight.contiguous()}, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClassificationHead:
        from safetensors import safe_open

        if not os.path.isfile(path):
            raise FileNotFoundError(f"head file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
            tensors = load_file(str(path))
        except Exception as err:  # safetensors raises several error types for damaged files
            raise ValueError(f"cannot read head file {path}: {err}") from err
        missing = [k for k in ("class_names", "logit_scale") if k not in meta] + (
            [] if "weight" in tensors else ["weight"]
        )
        if missing:
            raise ValueError(f"head file {path} lacks {missing}")
        return cls(tensors["weight"], float(meta["logit_scale"]), json.loads(meta["class_names"]))


class HeadBank:
    """Several tasks' heads stacked into one padded tensor, so a batch mixing tasks is scored at once:
    each sample uses its own task's head; padded classes get ``-inf`` logits."""

    def __init__(self, heads: Mapping[str, ClassificationHead]):
        if not heads:
            raise ValueError("HeadBank needs at least one head")
        dims = {name: head.dim for name, head in heads.items()}
        if len(set(dims.values())) != 1:
            raise ValueError(f"heads disagree on the feature dimension: {dims}")
        self.heads = dict(heads)
        self.task_names = list(heads)
        self.num_classes = torch.tensor([h.num_classes for h in heads.values()])
        c_max = int(self.num_classes.max())
        dim = next(iter(dims.values()))
        self.weight = torch.zeros(len(heads), c_max, dim)
        self.mask = torch.zeros(len(heads), c_max, dtype=torch.bool)
        for k, head in enumerate(heads.values()):
            self.weight[k, : head.num_classes] = head.weight
            self.mask[k, : head.num_classes] = True
        self.logit_scale = torch.tensor([h.logit_scale for h in heads.values()])

    def __len__(self) -> int:
        return len(self.task_names)

    def __getitem__(self, task: str) -> ClassificationHead:
        return self.heads[task]

    def logits(self, features: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` features and ``[N]`` task ids → ``[N, C_max]`` logits (padding = -inf)."""
        if features.shape[0] != task.shape[0]:
            raise ValueError(f"{features.shape[0]} feature rows but {task.shape[0]} task ids")
        task = task.to(features.device)
        weight = self.weight.to(features)[task]  # [N, C_max, D]
        scale = self.logit_scale.to(features)[task].unsqueeze(-1)
        logits = scale * torch.einsum("nd,ncd->nc", F.normalize(features, dim=-1), weight)
        return logits.masked_fill(~self.mask.to(features.device)[task], float("-inf"))
