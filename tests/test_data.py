"""Data loading: the seeded per-step batch sampler (the data order is a function of (seed, step), epochs are
permutations, ranks split each batch), the DataLoader passes (item-by-item oracle, worker processes, the
global RNG left alone), and the loader settings' errors."""

import math

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from vtvc_pyro.data import (
    LoaderConfig,
    MultiTaskDataset,
    StepBatchSampler,
    batch_loader,
    collate,
    sequential_batches,
    shard_range,
)


def dataset(n_per_task=(7, 6)) -> MultiTaskDataset:
    g = torch.Generator().manual_seed(1)
    splits = {name: TensorDataset(torch.randn(n, 3, 4, 4, generator=g),
                                  torch.randint(0, 5, (n,), generator=g))
              for name, n in zip(("a", "b"), n_per_task, strict=True)}
    return MultiTaskDataset(splits, ["a", "b"])


def reference_order(num_data, batch_size, seed, steps):
    """The pre-DataLoader data order, written as one stream: the epochs' seeded permutations chunked."""
    per_epoch = math.ceil(num_data / batch_size)
    out = []
    for epoch in range(math.ceil(steps / per_epoch)):
        perm = torch.randperm(num_data, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out += [perm[i:i + batch_size].tolist() for i in range(0, num_data, batch_size)]
    return out[:steps]


def test_sampler_reproduces_the_seeded_epoch_order_and_resumes_at_any_step():
    full = list(StepBatchSampler(13, 4, seed=3, start=0, stop=11))
    assert full == reference_order(13, 4, 3, 11)
    assert [len(b) for b in full[:4]] == [4, 4, 4, 1]
    assert sorted(sum(full[:4], [])) == list(range(13))  # an epoch visits every datum once
    assert list(StepBatchSampler(13, 4, seed=3, start=6, stop=11)) == full[6:]
    assert list(StepBatchSampler(13, 4, seed=4, start=0, stop=4)) != full[:4]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_every_global_batch_in_rank_order(world):
    full = list(StepBatchSampler(14, 5, seed=0, start=0, stop=6))
    shards = [list(StepBatchSampler(14, 5, seed=0, start=0, stop=6, rank=r, world_size=world))
              for r in range(world)]
    for step, batch in enumerate(full):
        parts = [s[step] for s in shards]
        assert sum(parts, []) == batch
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_shard_range_and_batches_too_small_to_split():
    assert [shard_range(10, r, 3) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]
    with pytest.raises(ValueError, match="rank 3 out of range for world size 3"):
        shard_range(10, 3, 3)
    with pytest.raises(ValueError, match="a mini-batch of 1 samples .* cannot be split over 2 ranks"):
        StepBatchSampler(13, 4, seed=0, start=0, stop=1, rank=0, world_size=2)  # 13 = 3·4 + 1
    assert sequential_batches(2, 9, 3) == [[2, 3, 4], [5, 6, 7], [8]]


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_equal_item_by_item_loading_and_leave_the_global_rng_alone(workers):
    data = dataset()
    sampler = StepBatchSampler(len(data), 4, seed=0, start=0, stop=5)
    torch.manual_seed(123)
    loaded = list(batch_loader(data, sampler, LoaderConfig(num_workers=workers)))
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))  # iterating drew nothing from the global RNG
    for (positions, images, labels, task), expected in zip(loaded, sampler, strict=True):
        items = [data[i] for i in expected]
        assert positions.tolist() == expected
        assert torch.equal(images, torch.stack([item[1] for item in items]))
        assert labels.tolist() == [item[2] for item in items]
        assert task.tolist() == [item[3] for item in items]
    assert loaded[0][2].dtype == loaded[0][3].dtype == torch.long


class Pairs(Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, i):
        return torch.zeros(2), i


def test_bad_items_and_loader_settings_raise_naming_the_key():
    with pytest.raises(ValueError, match=r"dataset items must be \(index, image, label, task_id\)"):
        next(iter(batch_loader(Pairs(), [[0, 1]])))
    with pytest.raises(ValueError, match="dataset items must be"):
        collate([(0, (1, 2))])
    with pytest.raises(ValueError, match="loader.num_workers: must be a non-negative integer, got -1"):
        LoaderConfig(num_workers=-1)
    with pytest.raises(ValueError, match="loader.prefetch_factor"):
        LoaderConfig(prefetch_factor=0)
    with pytest.raises(ValueError, match="loader.pin_memory"):
        LoaderConfig(pin_memory="yes")


def test_memory_is_pinned_for_cuda_targets_only_unless_set():
    assert LoaderConfig().options("cuda:0")["pin_memory"] is True
    assert LoaderConfig().options("cpu")["pin_memory"] is False
    assert LoaderConfig(pin_memory=False).options("cuda")["pin_memory"] is False
    assert LoaderConfig(num_workers=3).options("cpu") == {"num_workers": 3, "pin_memory": False,
                                                          "prefetch_factor": 2}


def test_a_fit_loading_through_worker_processes_equals_one_loading_in_process():
    from planted import planted_problem

    from vtvc_pyro.guide import AmortizedGuide
    from vtvc_pyro.inference import SVIConfig, fit_svi
    from vtvc_pyro.model import VTVCModel

    problem = planted_problem(num_per_task=10)
    fits = []
    for workers in (0, 2):
        torch.manual_seed(0)
        model = VTVCModel(problem.encoder, problem.heads, None, problem.task_names, problem.block_names)
        guide = AmortizedGuide(19, problem.task_names, problem.block_names, hidden_dim=8)
        config = SVIConfig(steps=5, batch_size=8, lr=0.02, progress=False)
        fits.append(fit_svi(model, guide, problem.data, config, loader=LoaderConfig(num_workers=workers)))
    assert fits[0].tempered_elbo == fits[1].tempered_elbo
    assert torch.equal(fits[0].features0, fits[1].features0)
