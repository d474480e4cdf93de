"""A planted composition problem for the Pyro-core tests: a linear "encoder", exactly linear in its
coefficients (``features = x @ (W0 + Σ_{t,b} coef[n, t, b] · ΔW[t, b])``), and tasks whose labels come from
their own head on features composed with a known sparse coefficient pattern."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from vtvc_pyro.data import MultiTaskDataset
from vtvc_pyro.heads import ClassificationHead, HeadBank

DATA_TASKS = ["alpha", "beta", "gamma"]


class LinearEncoder:
    """``encoder(x [n, I], coef [n, T, B]) -> x @ W0 + Σ_{t,b} coef[n, t, b] · (x @ ΔW[t, b])``."""

    def __init__(self, base: torch.Tensor, deltas: torch.Tensor):
        self.base, self.deltas = base, deltas  # [I, D], [T, B, I, D]
        self.calls = 0

    def __call__(self, x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x @ self.base + torch.einsum("ni,ntb,tbid->nd", x, coef, self.deltas)


@dataclass
class Planted:
    encoder: LinearEncoder
    heads: HeadBank
    data: MultiTaskDataset
    test: MultiTaskDataset  # fresh inputs from the same tasks (empty splits when num_test = 0)
    task_names: list[str]  # task vectors: one per data task, then the noise vectors
    block_names: list[str]
    truth: torch.Tensor  # [K data tasks, T, B] bool: the components that generated task k's labels
    true_coef: torch.Tensor  # [K, T, B]

    @property
    def feature_dim(self) -> int:
        return self.encoder.base.shape[1]


def planted_problem(num_per_task: int = 120, dim: int = 16, num_blocks: int = 2, num_classes: int = 4,
                    logit_scale: float = 20.0, base_scale: float = 0.5, delta_scale: float = 3.0,
                    seed: int = 0, noise_vectors: int = 0, num_test: int = 0) -> Planted:
    """Three tasks; task ``k``'s labels are its head's argmax on features composed with coefficient 1 on
    ``(t = k, b ∈ helpful_k)`` and 0 elsewhere. ``noise_vectors`` more task vectors (random, like the others)
    generate nothing. Inputs are ``[z, code_k]``: ``z ~ N(0, I)`` carries the label, the task code passes
    through ``W0`` to extra feature dimensions that no head reads, so the pre-trained features tell the tasks
    apart without biasing any class."""
    g = torch.Generator().manual_seed(seed)
    num_tasks = len(DATA_TASKS)
    vectors = DATA_TASKS + [f"noise{i}" for i in range(noise_vectors)]
    blocks = [f"block{b}" for b in range(num_blocks)]
    width = dim + num_tasks
    base = torch.zeros(width, width)
    base[:dim, :dim] = base_scale * torch.randn(dim, dim, generator=g) / dim**0.5
    base[dim:, dim:] = torch.eye(num_tasks)
    deltas = torch.zeros(num_tasks, num_blocks, width, width)
    noise = torch.randn(num_tasks, num_blocks, dim, dim, generator=g)
    deltas[..., :dim, :dim] = delta_scale * noise / dim**0.5
    encoder = LinearEncoder(base, deltas)
    truth = torch.zeros(num_tasks, len(vectors), num_blocks, dtype=torch.bool)
    helpful = {0: [0], 1: [0, 1], 2: [1]}  # data task -> blocks of its own task vector that generate labels
    for k, bs in helpful.items():
        truth[k, k, bs] = True
    true_coef = truth.float()
    heads, splits, tests = {}, {}, {}
    for k, name in enumerate(DATA_TASKS):
        weight = torch.zeros(num_classes, width)
        weight[:, :dim] = torch.randn(num_classes, dim, generator=g)
        head = ClassificationHead(weight, logit_scale, [f"{name}{c}" for c in range(num_classes)])
        code = 2.0 * F.one_hot(torch.full((num_per_task + num_test,), k), num_tasks).float()
        x = torch.cat([torch.randn(num_per_task + num_test, dim, generator=g), code], dim=1)
        labels = head(encoder(x, true_coef[k, :num_tasks].expand(len(x), -1, -1))).argmax(-1)
        heads[name] = head
        splits[name] = TensorDataset(x[:num_per_task], labels[:num_per_task])
        tests[name] = TensorDataset(x[num_per_task:], labels[num_per_task:])
    if noise_vectors:  # drawn after everything else, so the rest of the problem does not depend on them
        extra = torch.zeros(noise_vectors, num_blocks, width, width)
        extra[..., :dim, :dim] = delta_scale * torch.randn(noise_vectors, num_blocks, dim, dim, generator=g)
        encoder.deltas = torch.cat([deltas, extra / dim**0.5])
    encoder.calls = 0
    return Planted(encoder, HeadBank(heads), MultiTaskDataset(splits, DATA_TASKS),
                   MultiTaskDataset(tests, DATA_TASKS), vectors, blocks, truth, true_coef)
