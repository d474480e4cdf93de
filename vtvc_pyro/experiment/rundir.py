"""The run directory: resolved config, argv, environment, log, and a manifest of finished methods.

Re-opening a directory that holds the same resolved config resumes it; a different config is refused
unless ``force`` (which deletes the previous run's files, and only those). One process at a time: a run
holds an exclusive lock on its directory (``.vtvc.lock``) from :meth:`RunDirectory.open` until
:meth:`RunDirectory.close`; another run (or a ``--force``) is refused meanwhile, naming the holder.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import filelock
import yaml

from vtvc_pyro.io import WriteError, atomic_write, read_json, write_json

RUN_ENTRIES = (
    "manifest.json", "config.yaml", "argv.json", "environment.json", "run.log", "metrics.json",
    "table.md", "table.csv", "methods", "posteriors", "checkpoints", "plots",
)
"""Everything a run writes; ``force`` removes exactly these."""
LOCK_FILE = ".vtvc.lock"
OWNER_FILE = ".vtvc.lock.owner"
"""The lock a run holds for its lifetime, and who holds it (pid, host, start time, argv)."""


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


class RunDirectoryBusy(RunDirectoryError):
    """Another process holds the run directory's lock."""


class RunDirectory:
    """One run's files. Per-method results are ``methods/<name>.json``; the manifest says which are done.

    Use it as a context manager (or call :meth:`close`) to release the lock :meth:`open` takes.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._lock: filelock.BaseFileLock | None = None

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # an unclosed run (e.g. dropped by its caller) releases its lock too
        with contextlib.suppress(Exception):  # at interpreter shutdown there is nothing left to report to
            self.close()

    # ---------------------------------------------------------------- the lock

    def holder(self) -> dict[str, Any] | None:
        """Who holds (or last held) the lock: ``{"pid", "host", "started", "argv"}``, or None."""
        try:
            owner = json.loads((self.root / OWNER_FILE).read_text())
        except (OSError, ValueError):
            return None
        return owner if isinstance(owner, dict) else None

    def acquire(self) -> None:
        """Take the directory's exclusive lock for this process (re-entrant within it); raise
        :class:`RunDirectoryBusy` naming the holder's pid when another process has it."""
        if self._lock is not None:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise WriteError(f"cannot create the run directory {self.root}: {err.strerror or err}; choose "
                             "another --out") from err
        lock = filelock.FileLock(self.root.resolve() / LOCK_FILE, timeout=0, is_singleton=True,
                                 thread_local=False)
        try:
            lock.acquire()
        except filelock.Timeout:
            owner = self.holder()
            who = (f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"
                   if owner else "a process that has not yet recorded its pid")
            raise RunDirectoryBusy(
                f"{self.root} is in use by another vtvc run ({who}); wait for it to finish, or choose "
                "another --out"
            ) from None
        except OSError as err:
            raise WriteError(f"cannot lock the run directory {self.root}: {err.strerror or err}; choose a "
                             "writable --out") from err
        self._lock = lock
        if lock.lock_counter == 1:
            write_json(self.root / OWNER_FILE, {"pid": os.getpid(), "host": socket.gethostname(),
                                                "started": _now(), "argv": list(sys.argv)})

    def close(self) -> None:
        """Release the lock (the owner record goes with the last release in this process)."""
        lock, self._lock = self._lock, None
        if lock is None:
            return
        if lock.lock_counter == 1:
            (self.root / OWNER_FILE).unlink(missing_ok=True)
        lock.release()

    @property
    def locked(self) -> bool:
        return self._lock is not None

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def result_path(self, method: str) -> Path:
        return self.root / "methods" / f"{method}.json"

    def checkpoint_path(self, method: str, problem: str, depends_on: Any = None) -> Path:
        """The SVI checkpoint of ``method`` on one problem; a rerun continues from it.

        The file name carries a key of everything the fit depends on: the run's config digest (prior,
        guide, blocks, method settings, seed), its recorded input files, the method, the problem and
        ``depends_on`` (any JSON-able settings the caller adds), so a checkpoint written under other
        settings or data is never resumed.
        """
        manifest = self.read_manifest() or {}
        identity = {"config_digest": manifest.get("config_digest"), "inputs": manifest.get("inputs"),
                    "method": method, "problem": problem, "depends_on": depends_on}
        key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return self.root / "checkpoints" / method / f"{problem}-{key}.pt"

    def discard_checkpoint(self, method: str, problem: str, depends_on: Any = None) -> Path | None:
        """Move an unreadable checkpoint aside (``*.pt.damaged``) so the fit restarts from scratch; returns
        where it went (None when there was none). Finished methods are untouched."""
        path = self.checkpoint_path(method, problem, depends_on)
        if not path.exists():
            return None
        target = path.with_name(path.name + ".damaged")
        os.replace(path, target)
        return target

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
        if run.root.exists() and not run.root.is_dir():
            raise RunDirectoryError(f"{run.root} is a file, not a directory; choose another --out")
        run._refuse_foreign()
        run.acquire()
        try:
            return run._open(config, config_digest, invocation, force)
        except BaseException:
            run.close()
            raise

    def _refuse_foreign(self) -> None:
        """Refuse a directory that holds files but neither a manifest nor a run's lock."""
        if not self.root.is_dir() or self.manifest_path.is_file():
            return
        names = set(os.listdir(self.root))
        if LOCK_FILE in names:
            return  # a run is being created here (or was): the lock decides
        if names:
            raise self._foreign()

    def _foreign(self) -> RunDirectoryError:
        return RunDirectoryError(f"{self.root}: exists and is not a vtvc run directory (no manifest.json); "
                                 "choose another --out")

    def _open(self, config: dict[str, Any], config_digest: str, invocation: Mapping[str, Any],
              force: bool) -> RunDirectory:
        run = self
        try:
            manifest = run.read_manifest()
        except RunDirectoryError:
            if not force:
                raise
            manifest = None
        stray = {n for n in os.listdir(run.root) if not n.startswith(".")} - set(RUN_ENTRIES)
        if manifest is None and stray:
            raise run._foreign()
        if manifest is not None and manifest.get("config_digest") != config_digest and not force:
            old = run._recorded_config()
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
        with atomic_write(run.root / "config.yaml") as handle:
            yaml.safe_dump(config, handle, sort_keys=False, width=110)
        history = run.read_json("argv.json") or {"invocations": []}
        history["invocations"].append({**invocation, "started": _now(), "resumed": resumed})
        write_json(run.root / "argv.json", history)
        write_json(run.root / "environment.json", environment_info())
        run.write_manifest(manifest)
        return run

    def _recorded_config(self) -> dict[str, Any]:
        try:
            old = yaml.safe_load((self.root / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            return {}
        return old if isinstance(old, dict) else {}

    def clear(self) -> None:
        """Delete the files of a previous run (only the entries a run writes)."""
        for name in RUN_ENTRIES:
            path = self.root / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def read_json(self, name: str) -> Any:
        """A JSON file of the run (None if absent); a damaged one raises naming the file."""
        path = self.root / name
        if not path.is_file():
            return None
        try:
            return read_json(path)
        except ValueError as err:
            raise RunDirectoryError(f"{err}; pass --force to start the run over, or choose another --out"
                                    ) from None

    def read_manifest(self) -> dict[str, Any] | None:
        manifest = self.read_json("manifest.json")
        if manifest is not None and not (isinstance(manifest, dict) and isinstance(manifest.get("methods"),
                                                                                     dict)):
            raise RunDirectoryError(f"{self.manifest_path}: damaged manifest (no 'methods' mapping); pass "
                                    "--force to start the run over, or choose another --out")
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
        path = self.result_path(method)
        try:
            return read_json(path)
        except ValueError as err:
            raise RunDirectoryError(f"{err}; delete it and run the same command again to recompute "
                                    f"'{method}' (the other finished methods are kept)") from None

    def mark_complete(self) -> None:
        manifest = self.read_manifest() or {}
        manifest["completed"] = _now()
        self.write_manifest(manifest)
