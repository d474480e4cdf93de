"""Zoo presets: which tasks, how many images, which tiny CLIP, and how long to train it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from vtvc_pyro.zoo.tasks import Counts

# Bump when the data, training or file layout changes: old caches are then rebuilt, never reused.
FORMAT_VERSION = 2


@dataclass(frozen=True)
class TrainConfig:
    """One training loop's settings (AdamW, linear warm-up then cosine decay)."""

    epochs: int
    lr: float
    batch_size: int
    weight_decay: float = 0.1
    warmup: float = 0.1


@dataclass(frozen=True)
class ZooPreset:
    """Everything a zoo build depends on; recorded verbatim in ``zoo.json``."""

    name: str
    model_name: str
    image_size: int
    tasks: dict[str, Counts]
    pretrain: TrainConfig
    finetune: TrainConfig
    seed: int = 0
    val_fraction: float = 0.1
    max_val: int = 5000
    val_seed: int = 0
    eval_batch_size: int = 500
    ties_top_k: float = 0.2

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, ZooPreset] = {
    "default": ZooPreset(
        name="default",
        model_name="vtvc-vit-tiny-28",
        image_size=28,
        tasks={
            "mnist": Counts(train=1600, test=400, pretrain=400),
            "digits": Counts(train=1400, test=397),
            "textures": Counts(train=200, test=60, pretrain=50),
            "scenes": Counts(train=120, test=40, pretrain=30),
            "faces": Counts(train=140, test=60),
            "orientation": Counts(train=1400, test=400, pretrain=300),
        },
        pretrain=TrainConfig(epochs=20, lr=1e-3, batch_size=64),
        finetune=TrainConfig(epochs=10, lr=1e-3, batch_size=64),
    ),
    "micro": ZooPreset(
        name="micro",
        model_name="vtvc-vit-micro-28",
        image_size=28,
        tasks={
            "mnist": Counts(train=400, test=200, pretrain=200),
            "textures": Counts(train=60, test=30, pretrain=30),
            "scenes": Counts(train=40, test=20, pretrain=20),
        },
        pretrain=TrainConfig(epochs=30, lr=2e-3, batch_size=64),
        finetune=TrainConfig(epochs=15, lr=2e-3, batch_size=32),
    ),
}


def get_preset(name: str) -> ZooPreset:
    """The preset called ``name`` (``default`` or ``micro``)."""
    if name not in PRESETS:
        raise KeyError(f"unknown zoo preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
