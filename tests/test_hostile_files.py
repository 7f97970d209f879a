"""Damaged, unsafe or half-written files in run directories, exports, checkpoints and data (issue 30, class
2): every file adaptkit reads is checked against a manifest or for its shape, every failure is one line
naming the file and what to do, with exit status 2, and no pickle is ever run."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from adaptkit import checkpoint as ckpt
from adaptkit.artifacts import RUN_FILE
from adaptkit.cli import main
from tests.test_hostile_inputs import RECIPE, _first_line
from tests.test_resume import _overrides, _rehash


class _Payload:
    """Runs ``touch MARKER`` when unpickled: proof that a file was (or was not) unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    """A copy of the finished tiny run, to damage."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    return copy


def _predict(folder: Path, tiny_vqa: Path, *extra: str) -> int:
    image = str(tiny_vqa.parent / "images" / "0.png")
    return main(["predict", str(folder), "--image", image, "--question", "what is the shape?", *extra])


def _flip(file: Path, at: int = -10) -> None:
    data = bytearray(file.read_bytes())
    data[at] ^= 0xFF
    file.write_bytes(bytes(data))


def test_a_finished_run_is_sealed_and_loads(run, tiny_vqa, capsys):
    manifest = json.loads((run / RUN_FILE).read_text())
    assert manifest["format"] == "adaptkit-run"
    assert {"recipe.yaml", "adapter.safetensors", "lora/adapter_model.safetensors", "answers.json"} <= set(
        manifest["files"]
    )
    assert "train.log" not in manifest["files"] and "eval.json" not in manifest["files"]
    assert _predict(run, tiny_vqa, "--json") == 0


@pytest.mark.parametrize("name", ["adapter.safetensors", "lora/adapter_model.safetensors", "answers.json"])
def test_a_changed_run_file_is_refused(run, tiny_vqa, capsys, name):
    _flip(run / name)
    assert _predict(run, tiny_vqa) == 2
    line = _first_line(capsys)
    assert f"{run / name} was changed after the run directory was written" in line
    assert "retrain the run, or restore the file" in line


def test_a_corrupted_answer_set_is_refused_even_unverified(run, tiny_vqa, capsys):
    (run / "answers.json").write_text('{"answers": 17}')
    assert _predict(run, tiny_vqa, "--no-verify") == 2
    assert "answers.json is not a run file adaptkit wrote" in _first_line(capsys)


def test_truncated_and_pickled_weights_are_refused_and_never_unpickled(run, tiny_vqa, tmp_path, capsys):
    adapter = run / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    assert _predict(run, tiny_vqa) == 2
    assert "adapter.safetensors was changed after the run directory was written" in _first_line(capsys)
    assert _predict(run, tiny_vqa, "--no-verify") == 2  # the reader catches it without the manifest
    assert f"{adapter} is not a readable safetensors file" in _first_line(capsys)
    marker = tmp_path / "pickle-ran"
    torch.save({"x": _Payload(marker)}, adapter)  # a pickle under the safetensors name
    assert _predict(run, tiny_vqa, "--no-verify") == 2
    assert f"{adapter} is not a readable safetensors file" in _first_line(capsys)
    assert not marker.exists()


def test_a_pickle_beside_removed_lora_weights_is_never_loaded(run, tiny_vqa, tmp_path, capsys):
    marker = tmp_path / "pickle-ran"
    (run / "lora" / "adapter_model.safetensors").unlink()
    with (run / "lora" / "adapter_model.bin").open("wb") as handle:
        torch.save({"x": _Payload(marker)}, handle)
    for extra in ((), ("--no-verify",)):
        assert _predict(run, tiny_vqa, *extra) == 2
        line = _first_line(capsys)
        assert (
            f"{run / 'lora' / 'adapter_model.bin'} is a pickle-format file, which adaptkit never loads"
            in line
        )
    assert not marker.exists()


def test_a_link_out_of_the_run_directory_is_refused(run, tiny_vqa, capsys):
    adapter = run / "adapter.safetensors"
    adapter.unlink()
    adapter.symlink_to("/etc/hostname" if Path("/etc/hostname").exists() else "/etc/passwd")
    for extra in ((), ("--no-verify",)):
        assert _predict(run, tiny_vqa, *extra) == 2
        line = _first_line(capsys)
        assert f"{adapter} is a link to /etc/" in line and "outside the run directory" in line


def test_a_run_without_its_manifest_is_refused_unless_trusted(run, tiny_vqa, capsys):
    (run / RUN_FILE).unlink()  # an earlier adaptkit's run, or a deleted manifest
    assert _predict(run, tiny_vqa) == 2
    line = _first_line(capsys)
    assert f"{run / RUN_FILE} is missing" in line and "--no-verify" in line
    assert _predict(run, tiny_vqa, "--no-verify") == 0


def test_an_export_without_its_manifest_never_reaches_for_the_hub(tiny_run, tmp_path, tiny_vqa, capsys):
    from adaptkit.export import export_run

    out = tmp_path / "export"
    export_run(tiny_run, out)
    (out / "adaptkit_export.json").unlink()
    for extra in ((), ("--no-verify",)):
        assert _predict(out, tiny_vqa, *extra) == 2
        assert "looks like an export folder whose adaptkit_export.json is missing" in _first_line(capsys)


def test_an_export_file_linked_elsewhere_is_refused(tiny_run, tmp_path, tiny_vqa, capsys):
    from adaptkit.export import export_run

    out = tmp_path / "export"
    export_run(tiny_run, out)
    elsewhere = tmp_path / "config_elsewhere.json"
    shutil.copy(out / "lm" / "config.json", elsewhere)  # the same bytes: only the link is wrong
    (out / "lm" / "config.json").unlink()
    (out / "lm" / "config.json").symlink_to(elsewhere)
    assert _predict(out, tiny_vqa) == 2
    line = _first_line(capsys)
    assert f"{out / 'lm' / 'config.json'} is a link to {elsewhere}, outside the export" in line


# ---- checkpoints and resume --------------------------------------------------------------------------


@pytest.fixture
def crashed(tiny_overrides, tmp_path) -> tuple[Path, list[str]]:
    """A run that saved checkpoints at steps 2 and 4 of 18, then 'crashed' (its final files removed)."""
    out = tmp_path / "crashed"
    overrides = [o for o in _overrides(tiny_overrides, out) if not o.startswith("max_steps=")]
    assert main(["train", RECIPE, *overrides, "max_steps=4"]) == 0
    for name in ("adapter.safetensors", RUN_FILE, "summary.json", "eval.json", "answers.json"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "lora")
    (out / "recipe.yaml").write_text(
        (out / "recipe.yaml").read_text().replace("max_steps: 4", "max_steps: 6")
    )
    return out, [*overrides, "max_steps=6"]


def test_a_checkpoint_state_of_the_wrong_shape_is_one_line(crashed, capsys):
    out, overrides = crashed
    folder = ckpt.latest_checkpoint(out)
    state = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps({**state, "step": "four"}))
    assert main(["train", RECIPE, *overrides, "resume=auto"]) == 2
    assert "state.json is damaged (its sha256 differs" in _first_line(capsys)
    _rehash(folder)  # the manifest agrees: the shape check catches it
    assert main(["train", RECIPE, *overrides, "resume=auto"]) == 2
    line = _first_line(capsys)
    assert f"{folder / 'state.json'}: step must be non-negative" in line


def test_a_torn_last_metrics_line_does_not_block_resume(crashed, capsys):
    out, overrides = crashed
    with (out / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 5, "loss": 0.3')  # killed mid-write
    assert main(["train", RECIPE, *overrides, "resume=auto"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 6 and (out / RUN_FILE).is_file()


def test_a_full_disk_during_a_checkpoint_keeps_the_earlier_one(tiny_overrides, tmp_path, monkeypatch, capsys):
    out = tmp_path / "full"
    overrides = [o for o in _overrides(tiny_overrides, out) if not o.startswith("max_steps=")]
    real, calls = ckpt.write_main, []

    def fill_up(tmp, *args, **kwargs):
        calls.append(tmp)
        if len(calls) == 2:
            (tmp / "trainables.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tmp, *args, **kwargs)

    monkeypatch.setattr(ckpt, "write_main", fill_up)
    assert main(["train", RECIPE, *overrides, "max_steps=6"]) == 2
    line = _first_line(capsys)
    assert "could not write the checkpoint of step 4" in line and "No space left on device" in line
    assert "checkpoint-000002 is intact" in line and "resume=auto" in line
    assert [p.name for p in ckpt.checkpoint_root(out).iterdir()] == ["checkpoint-000002"]
    monkeypatch.setattr(ckpt, "write_main", real)
    assert main(["train", RECIPE, *overrides, "max_steps=6", "resume=auto"]) == 0


def test_a_commit_flushes_every_file_and_the_folders(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    folder = ckpt.staging_dir(tmp_path, 3)
    ckpt.begin(folder)
    for name in ("trainables.safetensors", "state.json"):
        (folder / name).write_text(name)
    final = ckpt.commit(folder, keep=2)
    assert {str(folder / "trainables.safetensors"), str(folder / "state.json"), str(folder)} <= set(synced)
    assert str(final.parent) in synced  # the rename itself is durable
    assert any(s.endswith(ckpt.MANIFEST) for s in synced)


# ---- images that are not files -------------------------------------------------------------------------


def test_fifos_devices_and_link_loops_are_not_images(tiny_run, tiny_vqa, tmp_path, capsys):
    from adaptkit.data.formats import load_vqa

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    rows = [
        {"image": str(p), "question": "what is the shape?", "answer": "circle"}
        for p in (fifo, "/dev/zero", loop)
    ]
    good = json.loads(tiny_vqa.read_text().splitlines()[0])
    rows.append({**good, "image": str(tiny_vqa.parent / good["image"])})
    data = tmp_path / "odd.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_vqa(str(data), "skip")
    assert len(loaded.samples) == 1 and len(loaded.skipped) == 3
    assert all("is not a regular file" in reason for reason in loaded.skipped), loaded.skipped
    assert main(["predict", str(tiny_run), "--image", "/dev/zero", "--question", "what is it?"]) == 2
    assert "/dev/zero is not a regular file" in _first_line(capsys)
    from adaptkit.data.images import open_image
    from adaptkit.data.records import DataError

    for path in (fifo, "/dev/zero", loop):
        with pytest.raises(DataError, match="is not a regular file"):
            open_image(str(path))


def test_an_unwritable_feature_cache_is_one_line(tiny_overrides, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")  # (tests run as root, for whom chmod cannot make a folder read-only)
    overrides = [o for o in tiny_overrides if not o.startswith("feature_cache_dir=")]
    assert main(["train", RECIPE, *overrides, f"feature_cache_dir={blocker / 'cache'}"]) == 2
    line = _first_line(capsys)
    assert f"feature_cache_dir {blocker / 'cache'}: cannot write there" in line and "none" in line


def test_a_full_disk_reported_by_safetensors_is_an_oserror(tiny_mobilenet_pth, tmp_path, monkeypatch):
    """safetensors reports a failed write as SafetensorError (this message is the one a real full disk gave
    while writing a feature store); adaptkit's writers turn it into the OSError it is, so the full-disk
    handling of checkpoints, run files and the feature cache applies."""
    import safetensors.torch
    from safetensors import SafetensorError

    from adaptkit.artifacts import save_safetensors
    from adaptkit.backbones.vision import build_vision_backbone
    from adaptkit.config import VisionConfig
    from adaptkit.data.feature_cache import FeatureCache
    from adaptkit.data.formats import DataError

    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as err:
        save_safetensors({"x": torch.zeros(4)}, tmp_path / "x.safetensors")
    assert err.value.errno == errno.ENOSPC
    backbone = build_vision_backbone(VisionConfig(weights=str(tiny_mobilenet_pth), image_size=64))
    cache = FeatureCache.for_backbone(tmp_path / "cache", backbone, "cpu")
    with pytest.raises(DataError, match="cannot write there .*No space left on device"):
        cache.put(["k"], torch.zeros(1, 2, 3))
    assert not list(cache.dir.glob("*.safetensors*")) and not list(cache.dir.glob(".*.tmp"))
    # Any other safetensors error is not disguised as a disk error.
    monkeypatch.setattr(
        safetensors.torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(SafetensorError("bad"))
    )
    with pytest.raises(SafetensorError):
        save_safetensors({"x": torch.zeros(4)}, tmp_path / "y.safetensors")
