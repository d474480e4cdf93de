"""Bad inputs refused where they enter, with one clear line (issue 15); the table of covered inputs is in
tests/README.md."""

from __future__ import annotations

import errno
import os
import random
import stat
import subprocess
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vtvc_pyro import cli, io
from vtvc_pyro.checkpoints import load_state_dict
from vtvc_pyro.compose import ComposedEncoder
from vtvc_pyro.experiment.rundir import RunDirectory, RunDirectoryError
from vtvc_pyro.task_vectors import TaskVectorBank, canonical_order


def _state(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g).to(dtype), "b": torch.randn(4, generator=g).to(dtype),
            "steps": torch.tensor([7])}


# ---------------------------------------------------------------- item 5: duplicate task names


def test_a_task_named_twice_is_refused_by_the_library_and_the_cli(micro_zoo, tmp_path, capsys):
    ft = micro_zoo.finetuned_paths
    pairs = [("a", ft["mnist"]), ("a", ft["scenes"])]
    with pytest.raises(ValueError, match=r"task 'a' is given twice \(.*mnist.safetensors and .*scenes"):
        TaskVectorBank.from_checkpoints(micro_zoo.pretrained_path, pairs)
    with pytest.raises(SystemExit):
        cli.main(["bank", "build", "--pretrained", str(micro_zoo.pretrained_path), "--finetuned",
                  f"a={ft['mnist']}", f"a={ft['scenes']}", "--out", str(tmp_path / "bank.safetensors")])
    assert "task 'a' is given twice" in capsys.readouterr().err
    assert not (tmp_path / "bank.safetensors").exists()
    pairs = [("a", ft["mnist"]), ("b", ft["scenes"])]
    assert TaskVectorBank.from_checkpoints(micro_zoo.pretrained_path, pairs).task_names == ["a", "b"]


# ---------------------------------------------------------------- item 6: non-finite banks on load


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_loading_a_bank_with_a_non_finite_task_vector_names_the_task_and_tensor(tmp_path, bad):
    bank = TaskVectorBank.from_state_dicts(_state(0), {"x": _state(1), "y": _state(2)})
    bank.task_vector("w")[1, 2, 3] = bad  # a view into the buffer: the file will hold it
    bank.save(tmp_path / "bank.safetensors")
    with pytest.raises(ValueError, match=r"bank.safetensors.*task 'y': 'w' holds a non-finite value"):
        TaskVectorBank.load(tmp_path / "bank.safetensors")


# ---------------------------------------------------------------- item 7: mixed precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_finetuned_weights_mixed_with_fp32_warn(dtype):
    with pytest.warns(UserWarning, match=rf"task 'half': fine-tuned weights are {dtype} where the "
                                         r"pre-trained weights are torch.float32.*stored as torch.bfloat16"):
        TaskVectorBank.from_state_dicts(_state(0), {"full": _state(1), "half": _state(2, dtype)},
                                        dtype="bfloat16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TaskVectorBank.from_state_dicts(_state(0, dtype), {"a": _state(1, dtype)})  # consistent: silent


# ---------------------------------------------------------------- item 8: canonical block order


def test_blocks_follow_the_models_own_order_whatever_the_file_order(micro_zoo, tmp_path):
    visual = micro_zoo.create_model().visual
    model_order = [k for k, v in visual.state_dict().items() if v.is_floating_point()]
    pretrained = load_state_dict(micro_zoo.pretrained_path)
    finetuned = load_state_dict(micro_zoo.finetuned_paths["mnist"])
    shuffled = list(pretrained)
    random.Random(0).shuffle(shuffled)
    assert canonical_order(shuffled) == model_order == [k for k in pretrained if k in model_order]
    # the same weights in other key orders: a plain safetensors file (sorted keys), a shuffled dict
    save_file({k: v.contiguous() for k, v in pretrained.items()}, str(tmp_path / "sorted.safetensors"))
    save_file({k: v.contiguous() for k, v in finetuned.items()}, str(tmp_path / "ft.safetensors"))
    banks = [
        TaskVectorBank.from_checkpoints(micro_zoo.pretrained_path, {"m": micro_zoo.finetuned_paths["mnist"]}),
        TaskVectorBank.from_checkpoints(tmp_path / "sorted.safetensors", {"m": tmp_path / "ft.safetensors"}),
        TaskVectorBank.from_state_dicts({k: pretrained[k] for k in shuffled},
                                        {"m": {k: finetuned[k] for k in reversed(shuffled)}}),
    ]
    for bank in banks:
        assert bank.block_names == model_order
        assert torch.equal(bank.vectors, banks[0].vectors)


def test_canonical_order_of_residual_blocks_is_numeric():
    blocks = [f"transformer.resblocks.{i}.ln_1.weight" for i in (1, 2, 10)]
    names = [blocks[2], blocks[1], blocks[0], "ln_post.bias", "proj", "ln_post.weight", "conv1.weight"]
    assert canonical_order(names) == ["proj", "conv1.weight", *blocks, "ln_post.weight", "ln_post.bias"]


# ---------------------------------------------------------------- items 10, 11: composed-encoder inputs


@pytest.fixture(scope="module")
def encoder(micro_zoo):
    visual = micro_zoo.create_model().visual
    return visual, ComposedEncoder(visual, micro_zoo.bank())


def test_uint8_images_are_refused_by_the_plain_and_the_composed_tower(encoder):
    visual, enc = encoder
    pixels = torch.full((2, 3, 28, 28), 200, dtype=torch.uint8)
    with pytest.raises(RuntimeError):
        visual(pixels)
    with pytest.raises(ValueError, match=r"images must be floating-point.*got dtype torch.uint8"):
        enc(pixels, torch.zeros(enc.num_tasks))
    floats = pixels.float() / 255
    torch.testing.assert_close(enc(floats, torch.zeros(enc.num_tasks)), visual(floats), rtol=1e-4, atol=1e-5)


def test_empty_batches_and_meta_tensors_are_refused_naming_the_argument(encoder):
    _, enc = encoder
    T = enc.num_tasks
    with pytest.raises(ValueError, match=r"images: the batch is empty \(N = 0\)"):
        enc(torch.zeros(0, 3, 28, 28), torch.zeros(T))
    with pytest.raises(ValueError, match="images is on the 'meta' device"):
        enc(torch.zeros(2, 3, 28, 28, device="meta"), torch.zeros(T))
    with pytest.raises(ValueError, match="coef is on the 'meta' device"):
        enc(torch.zeros(2, 3, 28, 28), torch.zeros(T, device="meta"))


# ---------------------------------------------------------------- item 11: run directory and files


def test_a_truncated_manifest_or_method_result_is_named_with_what_to_do(tmp_path):
    root = tmp_path / "run"
    with RunDirectory.open(root, {"seed": 0}, "abc", {"argv": []}) as run:
        run.save_result("zeroshot", {"tasks": {"a": {"accuracy": 0.5}}})
        text = run.result_path("zeroshot").read_text()
        run.result_path("zeroshot").write_text(text[: len(text) // 2])
        with pytest.raises(RunDirectoryError, match=r"methods/zeroshot.json: damaged JSON .*delete it and "
                                                    r"run the same command again"):
            run.load_result("zeroshot")
    text = (root / "manifest.json").read_text()
    (root / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(RunDirectoryError, match=r"manifest.json: damaged JSON.*pass --force"):
        RunDirectory.open(root, {"seed": 0}, "abc", {"argv": []})
    with RunDirectory.open(root, {"seed": 0}, "abc", {"argv": []}, force=True) as run:  # --force recovers
        assert run.read_manifest()["methods"] == {}


def test_out_under_a_file_and_a_read_only_out_give_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(io.WriteError, match=r"cannot (create the run directory|write).*file"):
        RunDirectory.open(tmp_path / "file" / "run", {"seed": 0}, "abc", {"argv": []})
    with pytest.raises(io.WriteError, match=r"cannot write .*out.json: it is a directory"):
        (tmp_path / "out.json").mkdir()
        io.write_json(tmp_path / "out.json", {})
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.access(read_only, os.W_OK):  # root ignores permission bits: make the refusal happen anyway
        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")
        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(io.WriteError, match=r"ro/x.json: permission denied or read-only") as err:
        io.write_json(read_only / "x.json", {})
    assert "\n" not in str(err.value)


def test_a_full_disk_gives_one_line_and_leaves_no_partial_file(tmp_path, monkeypatch):
    """Simulated: the file system refuses a write with ENOSPC (torch.save instead raises a stream
    RuntimeError; that case is covered on a real full tmpfs below when the test may mount one)."""
    class Full:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "open", Full, raising=False)  # what vtvc_pyro.io writes through
    with pytest.raises(io.WriteError, match=r"cannot write .*metrics.json: no space left on the device"):
        io.write_json(tmp_path / "metrics.json", {"a": 1})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def test_a_real_full_disk_during_torch_save_gives_one_line(tmp_path):
    mount = tmp_path / "small"
    if not _mount_tmpfs(mount, "1m"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        with pytest.raises(io.WriteError, match=r"checkpoint.pt: no space left on the device"), \
                io.atomic_path(mount / "checkpoint.pt") as tmp:
            torch.save({"x": torch.zeros(1 << 20)}, tmp)
        assert os.listdir(mount) == []
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True, timeout=30)


# ---------------------------------------------------------------- item 14: permissions follow the umask


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_umasks_permissions(tmp_path, umask):
    previous = os.umask(umask)
    try:
        io.write_json(tmp_path / "a.json", {})
        with io.atomic_path(tmp_path / "b.safetensors") as tmp:
            save_file({"x": torch.zeros(2)}, str(tmp))
    finally:
        os.umask(previous)
    for name in ("a.json", "b.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_read_json_names_the_damaged_file(tmp_path):
    (tmp_path / "x.json").write_text('{"a": [1, 2')
    with pytest.raises(ValueError, match=r"x.json: damaged JSON"):
        io.read_json(tmp_path / "x.json")
