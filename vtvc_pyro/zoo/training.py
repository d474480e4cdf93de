"""The zoo's two training loops: contrastive pre-training of the tiny CLIP (open_clip's ``ClipLoss``) and
fine-tuning of its image encoder on one task through that task's frozen zero-shot head."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from tqdm.auto import tqdm

from vtvc_pyro.heads import ClassificationHead
from vtvc_pyro.zoo.presets import TrainConfig


def _optimizer(module: torch.nn.Module, config: TrainConfig, total_steps: int):
    """AdamW with linear warm-up then cosine decay to zero over ``total_steps``. As in open_clip's
    training, gains, biases, embeddings of size 1 and the logit scale get no weight decay."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "logit_scale" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98))
    warmup = max(1, int(config.warmup * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch of shuffled index batches (the last, smaller batch is kept)."""
    return list(torch.randperm(n, generator=generator).split(batch_size))


def pretrain_clip(
    model: torch.nn.Module,
    images: torch.Tensor,
    caption_tokens: torch.Tensor,
    caption_options: Sequence[Sequence[int]],
    config: TrainConfig,
    seed: int,
    desc: str = "pre-train CLIP",
) -> float:
    """Train image and text towers together with the symmetric InfoNCE loss.

    ``images``: normalised ``[N, 3, H, W]``; ``caption_tokens``: ``[U, L]`` tokenised captions;
    ``caption_options[i]``: the caption ids image ``i`` may be paired with (one is drawn per epoch).
    Text features are computed once per distinct caption in a batch. Returns the last epoch's mean loss.
    """
    if len(caption_options) != len(images):
        raise ValueError(f"{len(images)} images but {len(caption_options)} caption option lists")
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(images) / config.batch_size)
    optimizer, schedule = _optimizer(model, config, config.epochs * steps_per_epoch)
    loss_fn = ClipLoss()
    model.train()
    epoch_loss = float("nan")
    with tqdm(total=config.epochs * steps_per_epoch, desc=desc, leave=False) as bar:
        for _ in range(config.epochs):
            choice = torch.tensor([opts[int(torch.randint(len(opts), (), generator=generator))]
                                   for opts in caption_options])
            total = 0.0
            for batch in _batches(len(images), config.batch_size, generator):
                unique, inverse = torch.unique(choice[batch], return_inverse=True)
                text = model.encode_text(caption_tokens[unique], normalize=True)[inverse]
                image = model.encode_image(images[batch], normalize=True)
                loss = loss_fn(image, text, model.logit_scale.exp())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                with torch.no_grad():  # CLIP's clamp: the temperature never exceeds 100
                    model.logit_scale.clamp_(0, math.log(100))
                total += loss.item() * len(batch)
                bar.update()
            epoch_loss = total / len(images)
            bar.set_postfix(loss=f"{epoch_loss:.3f}")
    model.eval()
    return epoch_loss


def finetune_encoder(
    visual: torch.nn.Module,
    head: ClassificationHead,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    seed: int,
    desc: str = "fine-tune",
) -> float:
    """Cross-entropy fine-tuning of the image encoder only; the zero-shot head stays frozen (the
    task-vector papers' protocol). Returns the last epoch's mean loss."""
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(images) / config.batch_size)
    optimizer, schedule = _optimizer(visual, config, config.epochs * steps_per_epoch)
    visual.train()
    epoch_loss = float("nan")
    with tqdm(total=config.epochs * steps_per_epoch, desc=desc, leave=False) as bar:
        for _ in range(config.epochs):
            total = 0.0
            for batch in _batches(len(images), config.batch_size, generator):
                loss = F.cross_entropy(head(visual(images[batch])), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.item() * len(batch)
                bar.update()
            epoch_loss = total / len(images)
            bar.set_postfix(loss=f"{epoch_loss:.3f}")
    visual.eval()
    return epoch_loss
