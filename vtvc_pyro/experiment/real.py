"""A benchmark from real checkpoints: an open_clip architecture, local pre-trained and fine-tuned image
encoders, zero-shot heads (files, or built from a full CLIP's text tower) and the standard datasets."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from vtvc_pyro.experiment.benchmark import SPLITS, Benchmark
from vtvc_pyro.experiment.config import ExperimentConfig
from vtvc_pyro.heads import ClassificationHead, HeadBank


def from_checkpoints(cfg: ExperimentConfig, pretrained: Path, finetuned: Mapping[str, Path],
                     progress: Callable[[str], None]) -> Benchmark:
    """θ0 from ``zoo.pretrained``, task vectors from ``zoo.finetuned``, heads from ``zoo.heads`` or
    ``zoo.clip``, data from ``zoo.data_root`` preprocessed as the architecture expects."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from vtvc_pyro.checkpoints import create_model
    from vtvc_pyro.standard_tasks import load_standard_tasks

    zoo = cfg.zoo
    progress(f"open_clip {zoo.model}: image encoder from {pretrained}")
    model = create_model(zoo.model, pretrained=pretrained, trust_pickle=zoo.trust_pickle).eval()
    transform = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    tasks = load_standard_tasks(list(finetuned), os.path.expanduser(zoo.data_root), transform)
    if zoo.heads:
        heads = {t: ClassificationHead.load(os.path.expanduser(zoo.heads[t])) for t in finetuned}
    else:
        clip_path = Path(os.path.expanduser(zoo.clip))
        progress(f"zero-shot heads from the text tower of {clip_path}")
        clip = create_model(zoo.model, pretrained=clip_path, trust_pickle=zoo.trust_pickle).eval()
        tokenizer = open_clip.get_tokenizer(zoo.model)
        heads = {t: ClassificationHead.from_text_tower(clip, tokenizer, tasks[t].class_names,
                                                       tasks[t].templates) for t in finetuned}
    return Benchmark(
        description=f"{zoo.model}, {len(finetuned)} task checkpoints",
        source=f"{pretrained}, {len(finetuned)} fine-tuned checkpoints, data in {zoo.data_root}",
        task_names=list(finetuned),
        model=model,
        heads=HeadBank(heads),
        splits={s: {t: tasks[t].split(s) for t in finetuned} for s in SPLITS},
        pretrained_path=pretrained,
        finetuned_paths=dict(finetuned),
        trust_pickle=zoo.trust_pickle,
        input_files={"pretrained": pretrained, **{f"finetuned.{t}": Path(p) for t, p in finetuned.items()},
                     **({f"heads.{t}": Path(os.path.expanduser(zoo.heads[t])) for t in finetuned} if zoo.heads
                        else {"clip": Path(os.path.expanduser(zoo.clip))})},
    )
