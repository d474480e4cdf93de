"""The run directory: resolved config, argv, environment, log, and a manifest of finished methods.

Re-opening a directory that holds the same resolved config resumes it; a different config is refused
unless ``force`` (which deletes the previous run's files, and only those).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from vtvc_pyro.io import atomic_write, write_json

RUN_ENTRIES = (
    "manifest.json", "config.yaml", "argv.json", "environment.json", "run.log", "metrics.json",
    "table.md", "table.csv", "methods", "posteriors", "checkpoints", "plots",
)
"""Everything a run writes; ``force`` removes exactly these."""


class RunDirectoryError(ValueError):
    """The run directory cannot be used as asked (it holds another run, or is not a run directory)."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): data}


def config_differences(old: dict, new: dict, limit: int = 5) -> str:
    """``"svi.steps: 300 → 200; seed: 0 → 1"`` for the first ``limit`` differing keys."""
    a, b = _flatten(old), _flatten(new)
    keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k, "<unset>") != b.get(k, "<unset>")]
    shown = "; ".join(f"{k}: {a.get(k, '<unset>')!r} → {b.get(k, '<unset>')!r}" for k in keys[:limit])
    return shown + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


def environment_info() -> dict[str, Any]:
    """Versions of the packages a result depends on, and the git commit of the code if there is one."""
    versions = {"python": platform.python_version()}
    for dist in ("vtvc_pyro", "torch", "open_clip_torch", "pyro-ppl", "numpy"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
            text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None
    import torch

    return {
        "versions": versions,
        "git_commit": commit,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "executable": sys.executable,
    }


class RunDirectory:
    """One run's files. Per-method results are ``methods/<name>.json``; the manifest says which are done."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def result_path(self, method: str) -> Path:
        return self.root / "methods" / f"{method}.json"

    def checkpoint_path(self, method: str, problem: str) -> Path:
        """The SVI checkpoint of ``method`` on one problem; a rerun continues from it."""
        return self.root / "checkpoints" / method / f"{problem}.pt"

    def posterior_dir(self, method: str) -> Path:
        return self.root / "posteriors" / method

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    @property
    def log_path(self) -> Path:
        return self.root / "run.log"

    @classmethod
    def open(
        cls, root: str | os.PathLike, config: dict[str, Any], config_digest: str,
        invocation: Mapping[str, Any], force: bool = False,
    ) -> RunDirectory:
        """Create, resume (same config) or — with ``force`` — restart the run in ``root``; ``invocation``
        (argv, config path, overrides, ...) is appended to ``argv.json``."""
        run = cls(root)
        manifest = run.read_manifest()
        if manifest is None and run.root.is_dir() and any(run.root.iterdir()):
            raise RunDirectoryError(
                f"{run.root}: exists and is not a vtvc run directory (no manifest.json); choose another --out"
            )
        if manifest is not None and manifest.get("config_digest") != config_digest and not force:
            previous = run.root / "config.yaml"
            old = yaml.safe_load(previous.read_text()) if previous.is_file() else {}
            raise RunDirectoryError(
                f"{run.root} holds a run with a different config ({config_differences(old, config)}); "
                "pick another --out, or pass --force to delete it and start over"
            )
        if force:
            run.clear()
            manifest = None
        resumed = manifest is not None
        if manifest is None:
            manifest = {"config_digest": config_digest, "created": _now(), "methods": {}}
        run.root.mkdir(parents=True, exist_ok=True)
        with atomic_write(run.root / "config.yaml") as handle:
            yaml.safe_dump(config, handle, sort_keys=False, width=110)
        history = run.read_json("argv.json") or {"invocations": []}
        history["invocations"].append({**invocation, "started": _now(), "resumed": resumed})
        write_json(run.root / "argv.json", history)
        write_json(run.root / "environment.json", environment_info())
        run.write_manifest(manifest)
        return run

    def clear(self) -> None:
        """Delete the files of a previous run (only the entries a run writes)."""
        for name in RUN_ENTRIES:
            path = self.root / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def read_json(self, name: str) -> Any:
        path = self.root / name
        if not path.is_file():
            return None
        with open(path) as handle:
            return json.load(handle)

    def read_manifest(self) -> dict[str, Any] | None:
        manifest = self.read_json("manifest.json")
        if manifest is not None and not isinstance(manifest.get("methods"), dict):
            raise RunDirectoryError(f"{self.manifest_path}: damaged manifest (no 'methods' mapping)")
        return manifest

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        write_json(self.manifest_path, manifest)

    def _update_method(self, method: str, **entry: Any) -> None:
        manifest = self.read_manifest()
        if manifest is None:
            raise RunDirectoryError(f"{self.manifest_path}: missing; the run directory was removed mid-run")
        manifest["methods"].setdefault(method, {}).update(entry)
        self.write_manifest(manifest)

    def bind_inputs(self, fingerprint: dict[str, Any]) -> None:
        """Record the benchmark's input files on the first invocation; on a resume, refuse to go on when
        they changed (results from different checkpoints would be mixed), naming what changed."""
        manifest = self.read_manifest() or {"methods": {}}
        recorded = manifest.get("inputs")
        if recorded is None:
            manifest["inputs"] = fingerprint
            self.write_manifest(manifest)
            return
        roles = recorded.keys() | fingerprint.keys()
        changed = sorted(k for k in roles if recorded.get(k) != fingerprint.get(k))
        if changed:
            detail = "; ".join(f"{k}: {recorded.get(k, 'absent')} → {fingerprint.get(k, 'absent')}"
                               for k in changed[:3])
            raise RunDirectoryError(
                f"{self.root} was started from other input files ({detail}); results computed from them "
                "would be mixed with new ones: pick another --out, or pass --force to start over"
            )

    def is_done(self, method: str) -> bool:
        entry = (self.read_manifest() or {"methods": {}})["methods"].get(method, {})
        return entry.get("status") == "done" and self.result_path(method).is_file()

    def mark_started(self, method: str) -> None:
        self._update_method(method, status="running", started=_now())

    def save_result(self, method: str, result: dict[str, Any]) -> None:
        """Write ``methods/<method>.json`` atomically, then record the method as done."""
        path = self.result_path(method)
        write_json(path, result)
        self._update_method(method, status="done", finished=_now(), result=str(path.relative_to(self.root)))

    def load_result(self, method: str) -> dict[str, Any]:
        with open(self.result_path(method)) as handle:
            return json.load(handle)

    def mark_complete(self) -> None:
        manifest = self.read_manifest() or {}
        manifest["completed"] = _now()
        self.write_manifest(manifest)
