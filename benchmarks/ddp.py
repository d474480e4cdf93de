"""Wall time of a VTVC fit on an embedded zoo (composed open_clip tower, one torch thread per process), in one
process or data-parallel under torchrun; rank 0 prints seconds per step and the final loss.

    .venv/bin/python benchmarks/ddp.py --steps 20 --batch-size 32
    .venv/bin/torchrun --standalone --nproc_per_node=2 benchmarks/ddp.py --steps 20 --batch-size 32
"""

from __future__ import annotations

import argparse
import time

import torch

from vtvc_pyro import distributed
from vtvc_pyro.compose import ComposedEncoder
from vtvc_pyro.data import MultiTaskDataset
from vtvc_pyro.guide import AmortizedGuide
from vtvc_pyro.inference import SVIConfig, fit_svi, pretrained_features
from vtvc_pyro.model import VTVCModel
from vtvc_pyro.zoo import load_zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--zoo", default="micro")
    args = parser.parse_args()
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    zoo = load_zoo(args.zoo, build_if_missing=False)
    bank = zoo.bank()
    encoder = ComposedEncoder(zoo.create_model().visual.eval(), bank)
    data = MultiTaskDataset({t: zoo.split(t, "val") for t in zoo.task_names}, zoo.task_names)
    torch.manual_seed(0)
    model = VTVCModel(encoder, zoo.heads, None, bank.task_names, bank.block_names)
    features0 = pretrained_features(model.frozen, data)
    guide = AmortizedGuide(features0.shape[1], bank.task_names, bank.block_names)
    config = SVIConfig(steps=args.steps, batch_size=args.batch_size, progress=False)
    distributed.barrier()
    start = time.perf_counter()
    fit = fit_svi(model, guide, data, config, features0=features0)
    seconds = time.perf_counter() - start
    if distributed.is_main():
        print(f"processes {distributed.world_size()}: {seconds / args.steps:.3f} s/step over {args.steps} "
              f"steps ({args.zoo} zoo, global batch {args.batch_size}, {len(data)} data); "
              f"final tempered ELBO per datum {fit.tempered_elbo[-1]:.6f}")


if __name__ == "__main__":
    main()
