"""The embedded benchmark: task splits, disjointness, checkpoint layout, heads, recorded numbers, cache."""

import hashlib
import json
import os
import shutil
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

from vtvc_pyro import cli
from vtvc_pyro.checkpoints import load_state_dict
from vtvc_pyro.device import torch_threads
from vtvc_pyro.zoo import build as zoo_build
from vtvc_pyro.zoo import get_preset, load_zoo, summarize_zoo, verify_zoo
from vtvc_pyro.zoo.tasks import Counts, build_task
from vtvc_pyro.zoo.training import finetune_encoder


def _hashes(images):
    return {hashlib.sha256(img.numpy().tobytes()).hexdigest() for img in images}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _copy_zoo(zoo, cache_dir):
    """A private copy of the session's micro zoo, in a cache directory of its own."""
    target = cache_dir / "zoo" / zoo.root.name
    shutil.copytree(zoo.root, target)
    return target


def test_layout_and_manifest(micro_zoo):
    preset = get_preset("micro")
    assert micro_zoo.task_names == list(preset.tasks)
    assert micro_zoo.pretrained_path.is_file()
    assert all(p.is_file() for p in micro_zoo.finetuned_paths.values())
    manifest = json.loads((micro_zoo.root / "zoo.json").read_text())
    assert manifest["model_name"] == preset.model_name
    for info in manifest["tasks"].values():
        assert info["class_names"] and info["templates"]
        assert info["sizes"]["val"] == int(0.1 * (info["sizes"]["train"] + info["sizes"]["val"]))
    assert verify_zoo(micro_zoo.root) == []
    assert set(manifest["files"]) >= {"pretrained.safetensors", "clip.safetensors",
                                      "data/pretrain.safetensors", "finetuned/mnist.safetensors",
                                      "heads/mnist.safetensors", "data/mnist.safetensors",
                                      f"{preset.model_name}.json"}


def test_checkpoints_load_back_through_the_foundation(micro_zoo):
    model = micro_zoo.create_model()
    theta0 = load_state_dict(micro_zoo.pretrained_path)
    assert set(theta0) == set(model.visual.state_dict())
    for name, value in model.visual.state_dict().items():
        assert torch.equal(theta0[name], value), name
    bank = micro_zoo.bank()
    assert bank.task_names == micro_zoo.task_names
    raw0 = load_file(str(micro_zoo.pretrained_path))
    for t, task in enumerate(micro_zoo.task_names):
        raw = load_file(str(micro_zoo.finetuned_paths[task]))
        for name in ("conv1.weight", "transformer.resblocks.0.attn.in_proj_weight", "proj"):
            assert torch.allclose(bank.task_vector(name)[t].float(), raw[name] - raw0[name], atol=1e-7)
    assert any(bank.task_vector("proj").abs().sum() > 0 for _ in [0])


def test_heads_are_the_text_towers_zero_shot_classifier(micro_zoo):
    # independent reference: average of normalised prompt embeddings, renormalised, per class
    model = micro_zoo.create_model()
    tokenizer = micro_zoo.tokenizer()
    info = micro_zoo.manifest["tasks"]["textures"]
    with torch.no_grad():
        rows = []
        for name in info["class_names"]:
            emb = model.encode_text(tokenizer([t.format(name) for t in info["templates"]]), normalize=True)
            rows.append(torch.nn.functional.normalize(emb.mean(0), dim=-1))
    head = micro_zoo.heads["textures"]
    assert torch.allclose(head.weight, torch.stack(rows), atol=1e-5)
    assert head.logit_scale == pytest.approx(model.logit_scale.exp().item())


def test_splits_are_deterministic_and_follow_the_protocol(micro_zoo):
    full = load_file(str(micro_zoo.root / "data" / "mnist.safetensors"))["train_images"]
    n = len(full)
    v = int(0.1 * n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    val = micro_zoo.split("mnist", "val")
    train = micro_zoo.split("mnist", "train")
    assert torch.equal(val.images, full[order[n - v:]])
    assert torch.equal(train.images, full[order[: n - v]])
    image, label = val[0]
    assert image.dtype == torch.float32 and image.shape == (3, 28, 28) and isinstance(label, int)
    mean = torch.tensor(micro_zoo.image_mean).view(3, 1, 1)
    std = torch.tensor(micro_zoo.image_std).view(3, 1, 1)
    assert torch.allclose(image, (full[order[n - v]].float() / 255 - mean) / std)


def test_task_images_are_rebuilt_identically(micro_zoo):
    counts = get_preset("micro").tasks["textures"]
    first, second = build_task("textures", counts, 28, 0), build_task("textures", counts, 28, 0)
    assert torch.equal(first.train[0], second.train[0]) and torch.equal(first.test[1], second.test[1])
    stored = load_file(str(micro_zoo.root / "data" / "textures.safetensors"))
    assert torch.equal(stored["test_images"], first.test[0])
    assert not torch.equal(build_task("textures", counts, 28, 1).test[0], first.test[0])


def test_pretraining_pool_is_disjoint_from_every_val_and_test_image(micro_zoo):
    pretrain = _hashes(micro_zoo.pretraining_images())
    assert len(pretrain) > 100
    for task in micro_zoo.task_names:
        for split in ("val", "test"):
            assert pretrain.isdisjoint(_hashes(micro_zoo.split(task, split).images)), (task, split)
        assert _hashes(micro_zoo.split(task, "train").images).isdisjoint(
            _hashes(micro_zoo.split(task, "test").images)), task


def test_all_default_tasks_build_from_shipped_data():
    tasks = {name: build_task(name, Counts(train=8, test=4, pretrain=2), 28, 0)
             for name in get_preset("default").tasks}
    assert len(tasks) >= 6
    for name, task in tasks.items():
        images, labels = task.train
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 28, 28), name
        assert int(labels.max()) < len(task.class_names), name
        assert task.test[0].shape[0] > 0, name
    with pytest.raises(KeyError, match="'fashion'"):
        build_task("fashion", Counts(1, 1), 28, 0)


def test_recorded_accuracies_match_a_fresh_evaluation(micro_zoo):
    visual = micro_zoo.create_model().visual
    visual.load_state_dict(load_state_dict(micro_zoo.finetuned_paths["scenes"]))
    images, labels = micro_zoo.split("scenes", "test").tensors()
    with torch.no_grad():
        predicted = micro_zoo.heads["scenes"](visual(images)).argmax(-1)
    fresh = (predicted == labels).float().mean().item()
    assert micro_zoo.accuracy("finetuned")["scenes"] == pytest.approx(fresh)
    zs, ft = micro_zoo.accuracy("zeroshot"), micro_zoo.accuracy("finetuned")
    assert sum(ft.values()) > sum(zs.values())
    table = summarize_zoo(micro_zoo)
    for method in ("zeroshot", "finetuned", "task_arithmetic", "ties"):
        assert f"| {method}" in table


def test_finetuning_is_deterministic(micro_zoo):
    config = get_preset("micro").finetune
    images, labels = micro_zoo.split("mnist", "train").tensors()
    images, labels = images[:64], labels[:64]
    weights = []
    for _ in range(2):
        visual = micro_zoo.create_model().visual
        finetune_encoder(visual, micro_zoo.heads["mnist"], images, labels, config, seed=3)
        weights.append(visual.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_corrupted_cache_is_detected_reported_and_rebuilt(micro_zoo, tmp_path, monkeypatch):
    root = _copy_zoo(micro_zoo, tmp_path)
    target = root / "finetuned" / "mnist.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    assert verify_zoo(root) == [f"checksum mismatch in {target}"]
    with pytest.raises(ValueError, match="finetuned/mnist.safetensors"):
        load_zoo("micro", cache_dir=tmp_path, build_if_missing=False)

    # the rebuild itself is the real builder's job; here it copies the pristine zoo to stay fast
    calls = []

    def fake_write(staging, preset):
        calls.append(preset.name)
        shutil.rmtree(staging)
        shutil.copytree(micro_zoo.root, staging)

    monkeypatch.setattr(zoo_build, "_write_zoo", fake_write)
    with pytest.warns(RuntimeWarning, match="finetuned/mnist.safetensors"):
        zoo = load_zoo("micro", cache_dir=tmp_path)
    assert calls == ["micro"]
    assert verify_zoo(zoo.root) == []
    assert target.read_bytes() == micro_zoo.finetuned_paths["mnist"].read_bytes()
    left = [p.name for p in (tmp_path / "zoo").iterdir() if p.name != root.name]
    assert left == [f".{root.name}.lock"]  # no staging or old zoo left behind, only the build lock


def test_missing_file_is_detected(micro_zoo, tmp_path):
    root = _copy_zoo(micro_zoo, tmp_path)
    (root / "heads" / "scenes.safetensors").unlink()
    assert verify_zoo(root) == [f"missing file {root / 'heads' / 'scenes.safetensors'}"]
    with pytest.raises(ValueError, match="heads/scenes.safetensors"):
        load_zoo("micro", cache_dir=tmp_path, build_if_missing=False)


def test_missing_zoo_without_building(tmp_path):
    with pytest.raises(FileNotFoundError, match="vtvc zoo build --preset micro"):
        load_zoo("micro", cache_dir=tmp_path, build_if_missing=False)
    with pytest.raises(KeyError, match="'huge'"):
        load_zoo("huge", cache_dir=tmp_path)


def test_cli_zoo_build_reuses_an_intact_cache(micro_zoo, tmp_path, capsys, monkeypatch):
    _copy_zoo(micro_zoo, tmp_path)
    monkeypatch.setattr(zoo_build, "_write_zoo", lambda *a: pytest.fail("an intact cache was rebuilt"))
    cli.main(["zoo", "build", "--preset", "micro", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| task_arithmetic (α=" in out and "| ties (α=" in out and "mean norm" in out


def test_a_build_runs_with_the_pinned_thread_count_and_restores_the_callers(micro_zoo, tmp_path, monkeypatch):
    seen = []

    def spy_write(staging, preset):
        seen.append(torch.get_num_threads())
        shutil.rmtree(staging)
        shutil.copytree(micro_zoo.root, staging)

    monkeypatch.setattr(zoo_build, "_write_zoo", spy_write)
    caller = 3 if zoo_build.BUILD_THREADS != 3 else 1
    with torch_threads(caller):
        zoo_build.build_zoo("micro", cache_dir=tmp_path)
        assert (seen, torch.get_num_threads()) == ([zoo_build.BUILD_THREADS], caller)


@pytest.mark.slow
def test_two_builds_are_identical(micro_zoo, tmp_path):
    # the second build from a process with another thread count: float sums split over another number of
    # threads round differently, which the build's pinned thread count rules out
    from safetensors import safe_open

    with torch_threads(torch.get_num_threads() + 1):
        again = zoo_build.build_zoo("micro", cache_dir=tmp_path)
    assert again.manifest["results"] == micro_zoo.manifest["results"]
    assert set(again.manifest["files"]) == set(micro_zoo.manifest["files"])
    # safetensors orders header metadata arbitrarily, so compare contents, not file bytes
    for rel in (r for r in micro_zoo.manifest["files"] if r.endswith(".safetensors")):
        first, second = load_file(str(micro_zoo.root / rel)), load_file(str(again.root / rel))
        assert first.keys() == second.keys(), rel
        assert all(torch.equal(first[k], second[k]) for k in first), rel
        with safe_open(str(micro_zoo.root / rel), "pt") as a, safe_open(str(again.root / rel), "pt") as b:
            assert a.metadata() == b.metadata(), rel


def test_a_file_missing_from_the_manifest_is_still_verified(micro_zoo, tmp_path):
    """Both ways: an unlisted file is a problem (it used to be read unchecked), and so is an extra one."""
    root = _copy_zoo(micro_zoo, tmp_path)
    manifest = json.loads((root / "zoo.json").read_text())
    del manifest["files"]["finetuned/mnist.safetensors"]
    (root / "zoo.json").write_text(json.dumps(manifest))
    target = root / "finetuned" / "mnist.safetensors"
    target.write_bytes(target.read_bytes()[:-8] + b"\x00" * 8)  # a corrupted copy
    assert verify_zoo(root) == [f"{root / 'zoo.json'} does not list finetuned/mnist.safetensors",
                                f"file {target} is not listed in zoo.json"]
    root = _copy_zoo(micro_zoo, tmp_path / "extra")
    (root / "heads" / "stray.safetensors").write_bytes(b"x")
    assert verify_zoo(root) == [f"file {root / 'heads' / 'stray.safetensors'} is not listed in zoo.json"]


def test_fingerprint_follows_tensor_contents_not_file_bytes(micro_zoo, tmp_path):
    """A repaired zoo with bit-identical weights (other build time, other safetensors header) keeps its
    fingerprint, so a partial run can resume; a changed weight changes it."""
    from safetensors import safe_open

    from vtvc_pyro.io import sha256_file
    from vtvc_pyro.zoo import zoo_fingerprint

    root = _copy_zoo(micro_zoo, tmp_path)
    original = zoo_fingerprint(root)
    manifest = json.loads((root / "zoo.json").read_text())
    manifest["build_seconds"] += 12.5
    rel = "finetuned/mnist.safetensors"
    with safe_open(str(root / rel), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    save_file(dict(reversed(list(tensors.items()))), str(root / rel), metadata={**metadata, "rebuilt": "yes"})
    manifest["files"][rel] = sha256_file(root / rel)
    (root / "zoo.json").write_text(json.dumps(manifest))
    assert verify_zoo(root) == [] and manifest["files"][rel] != micro_zoo.manifest["files"][rel]
    assert zoo_fingerprint(root) == original
    tensors["proj"][0, 0] += 1e-3
    save_file(tensors, str(root / rel), metadata=metadata)
    assert zoo_fingerprint(root)["content_sha256"] != original["content_sha256"]
    assert original["format_version"] == micro_zoo.manifest["format_version"]


def test_an_unwritable_cache_gives_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):
        cli.main(["zoo", "build", "--preset", "micro", "--cache-dir", str(tmp_path / "file")])
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write the zoo cache {tmp_path / 'file' / 'zoo'}")
    assert "--cache-dir" in err and err.count("\n") == 1


def test_a_built_zoo_follows_the_umask(micro_zoo):
    """The zoo directory used to keep mkdtemp's 0700 and its files mkstemp's 0600."""
    assert stat.S_IMODE(micro_zoo.root.stat().st_mode) == 0o777 & ~_umask()
    for rel in ("zoo.json", "pretrained.safetensors", "finetuned/mnist.safetensors"):
        assert stat.S_IMODE((micro_zoo.root / rel).stat().st_mode) == 0o666 & ~_umask(), rel
