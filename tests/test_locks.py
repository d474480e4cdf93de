"""Nothing lost, nothing mixed: run-directory locks, keyed checkpoints and zoo-cache builds, with real
second processes (bounded in time)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from vtvc_pyro.experiment.rundir import OWNER_FILE, RunDirectory, RunDirectoryBusy, RunDirectoryError
from vtvc_pyro.experiment.runner import run_experiment
from vtvc_pyro.zoo import build as zoo_build
from vtvc_pyro.zoo import verify_zoo, zoo_root

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "configs" / "smoke.yaml"
LIMIT = 120  # seconds any helper process may live


class Holder:
    """A second Python process that runs ``setup`` (its last line may print), says ``ready``, and waits for
    a line on stdin before exiting."""

    def __init__(self, setup: str):
        script = f"import sys\n{textwrap.dedent(setup)}\nprint('ready', flush=True)\nsys.stdin.readline()\n"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script], cwd=ROOT, text=True, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )

    def __enter__(self) -> Holder:
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            raise AssertionError(f"helper process failed: {line}{self.proc.stderr.read()}")
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.proc.communicate("\n", timeout=LIMIT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


# rundir.py loaded on its own: importing the vtvc_pyro.experiment package would cost the helper process
# torch, Pyro and open_clip
_RUNDIR = f"""
import importlib.util
path = {str(ROOT / "vtvc_pyro" / "experiment" / "rundir.py")!r}
spec = importlib.util.spec_from_file_location("rundir", path)
rundir = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rundir)
rundir.environment_info = lambda: {{}}
"""


def _hold_run(root: Path, digest: str = "abc") -> str:
    return _RUNDIR + f"""
run = rundir.RunDirectory.open({str(root)!r}, {{"seed": 0}}, {digest!r}, {{"argv": ["holder"]}})
"""


# ---------------------------------------------------------------- run directories


def test_a_second_process_is_refused_naming_the_holders_pid(tmp_path):
    root = tmp_path / "run"
    with Holder(_hold_run(root)) as holder:
        with pytest.raises(RunDirectoryBusy, match=rf"in use by another vtvc run \(pid {holder.proc.pid} "):
            RunDirectory.open(root, {"seed": 0}, "abc", {"argv": []})
        before = json.loads((root / "manifest.json").read_text())
        with pytest.raises(RunDirectoryBusy, match=rf"pid {holder.proc.pid}"):
            RunDirectory.open(root, {"seed": 1}, "other", {"argv": []}, force=True)
        assert json.loads((root / "manifest.json").read_text()) == before  # --force deleted nothing
    with RunDirectory.open(root, {"seed": 0}, "abc", {"argv": []}) as run:  # the holder exited: free
        assert run.holder()["pid"] == os.getpid()
        assert len(json.loads((root / "argv.json").read_text())["invocations"]) == 2
    assert not (root / OWNER_FILE).exists()


def test_a_run_being_created_is_reported_as_busy_not_as_foreign(tmp_path):
    """The loser of two concurrent runs used to read 'not a vtvc run directory' (issue 15, item 12)."""
    root = tmp_path / "run"
    setup = _RUNDIR + f"""
held = rundir.RunDirectory({str(root)!r})
held.acquire()  # locked, manifest not yet written
"""
    with Holder(setup) as holder:
        with pytest.raises(RunDirectoryBusy, match=rf"pid {holder.proc.pid}") as err:
            RunDirectory.open(root, {"seed": 1}, "different", {"argv": []})
        assert "not a vtvc run directory" not in str(err.value)


def test_vtvc_run_and_force_are_refused_while_another_run_holds_the_directory(micro_zoo, tmp_path):
    root = tmp_path / "run"
    with Holder(_hold_run(root, "someone else's config")) as holder:
        for force in (False, True):
            with pytest.raises(RunDirectoryBusy, match=rf"pid {holder.proc.pid}"):
                run_experiment(SMOKE, ["--methods=[zeroshot, finetuned]"], out=root, force=force,
                               progress=False)
        assert yaml.safe_load((root / "config.yaml").read_text()) == {"seed": 0}
        assert not (root / "methods").exists()


def test_the_lock_is_reentrant_within_a_process_and_released_by_close(tmp_path):
    root = tmp_path / "run"
    first = RunDirectory.open(root, {"seed": 0}, "abc", {"argv": []})
    second = RunDirectory.open(root, {"seed": 0}, "abc", {"argv": []})  # same process: allowed
    second.close()
    assert first.locked and (root / OWNER_FILE).is_file()
    first.close()
    assert not (root / OWNER_FILE).exists()
    with Holder(_hold_run(root)):  # another process can take it now
        pass


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(RunDirectoryError, match=r"out is a file, not a directory; choose another --out"):
        RunDirectory.open(tmp_path / "out", {"seed": 0}, "abc", {"argv": []})


def test_checkpoints_are_keyed_on_config_inputs_method_and_problem(tmp_path):
    root = tmp_path / "run"
    with RunDirectory.open(root, {"prior": {"pi": 0.5}}, "digest-pi-0.5", {"argv": []}) as run:
        run.bind_inputs({"zoo": {"content_sha256": "aaa"}})
        old = run.checkpoint_path("vtvc", "all")
        assert old == run.checkpoint_path("vtvc", "all")  # stable within a run
        assert len({old, run.checkpoint_path("vtvc", "mnist"), run.checkpoint_path("atlas", "all"),
                    run.checkpoint_path("vtvc", "all", depends_on={"steps": 3})}) == 4
        old.parent.mkdir(parents=True)
        old.write_bytes(b"fit under pi 0.5")
    with RunDirectory.open(root, {"prior": {"pi": 0.2}}, "digest-pi-0.2", {"argv": []}, force=True) as run:
        run.bind_inputs({"zoo": {"content_sha256": "aaa"}})
        # a checkpoint of the old config, put back by hand (or left by a racing process), is never resumed
        old.parent.mkdir(parents=True, exist_ok=True)
        old.write_bytes(b"fit under pi 0.5")
        new = run.checkpoint_path("vtvc", "all")
        assert new != old and not new.exists()


def test_a_damaged_checkpoint_is_moved_aside_and_finished_methods_kept(tmp_path):
    with RunDirectory.open(tmp_path / "run", {"seed": 0}, "abc", {"argv": []}) as run:
        run.save_result("zeroshot", {"tasks": {}})
        path = run.checkpoint_path("vtvc", "all")
        path.parent.mkdir(parents=True)
        path.write_bytes(b"PK\x03\x04 truncated")
        moved = run.discard_checkpoint("vtvc", "all")
        assert moved == path.with_name(path.name + ".damaged") and moved.read_bytes().startswith(b"PK")
        assert not path.exists() and run.discard_checkpoint("vtvc", "all") is None
        assert run.is_done("zeroshot")


# ---------------------------------------------------------------- the zoo cache

def test_a_second_build_waits_for_the_first_and_uses_its_zoo(micro_zoo, tmp_path, monkeypatch):
    """Two runs on an empty cache: the second build used to delete the zoo the first had just put in place.
    Here a helper process holds the preset's build lock and builds (a copy of the micro zoo, slowly; it
    imports only filelock, to stay fast) while this process asks for the zoo."""
    cache, log = tmp_path / "cache", tmp_path / "builds.log"
    root = zoo_root("micro", cache)
    root.parent.mkdir(parents=True)
    setup = f"""
import os, shutil, threading, time
import filelock
lock = filelock.FileLock({str(root.parent / f".{root.name}.lock")!r}, thread_local=False)
lock.acquire()
def build():
    time.sleep(2.0)
    shutil.copytree({str(micro_zoo.root)!r}, {str(root.parent / "staging")!r})
    os.rename({str(root.parent / "staging")!r}, {str(root)!r})
    with open({str(log)!r}, "a") as f:
        f.write("helper\\n")
    lock.release()
threading.Thread(target=build).start()
"""

    def own_write(staging, preset):
        with log.open("a") as f:
            f.write("this process\n")
        shutil.rmtree(staging)
        shutil.copytree(micro_zoo.root, staging)

    monkeypatch.setattr(zoo_build, "_write_zoo", own_write)
    with Holder(setup):
        with pytest.warns(RuntimeWarning, match="another process is building the zoo"):
            zoo = zoo_build.load_zoo("micro", cache_dir=cache)
        assert all(path.is_file() for path in zoo.finetuned_paths.values())
    assert log.read_text().splitlines() == ["helper"]
    assert verify_zoo(root) == []
    assert sorted(p.name for p in root.parent.iterdir()) == sorted([root.name, f".{root.name}.lock"])


def test_a_failed_forced_rebuild_leaves_the_valid_zoo_in_place(micro_zoo, tmp_path, monkeypatch):
    root = zoo_root("micro", tmp_path)
    shutil.copytree(micro_zoo.root, root)

    def broken(staging, preset):
        (staging / "clip.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(zoo_build, "_write_zoo", broken)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        zoo_build.build_zoo("micro", cache_dir=tmp_path, force=True)
    assert verify_zoo(root) == []
    assert sorted(p.name for p in root.parent.iterdir()) == sorted([root.name, f".{root.name}.lock"])
