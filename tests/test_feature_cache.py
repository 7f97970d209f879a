"""The frozen-feature disk cache: equal to encoding, invalidated by any change, robust to damage."""

from __future__ import annotations

import shutil

import pytest
import torch

from adaptkit.backbones.vision import build_vision_backbone
from adaptkit.config import VisionConfig
from adaptkit.data.encoding import encode_images
from adaptkit.data.feature_cache import FeatureCache
from adaptkit.data.features import FeatureBank
from adaptkit.data.formats import DataError
from adaptkit.data.images import open_image
from adaptkit.data.pixels import OnTheFlyFeatures
from tests.conftest import draw_sample


@pytest.fixture
def images(tmp_path):
    paths = []
    for i, (color, shape) in enumerate([("red", "circle"), ("blue", "rectangle"), ("green", "circle")]):
        path = tmp_path / f"img{i}.png"
        draw_sample(path, color, shape)
        paths.append(str(path))
    return paths


def _backbone(pth, size=64):
    return build_vision_backbone(VisionConfig(weights=str(pth), image_size=size))


def _bank(backbone, paths, root=None, **kw):
    cache = FeatureCache.for_backbone(root, backbone, "cpu") if root is not None else None
    return FeatureBank.compute(
        backbone, paths, {}, torch.device("cpu"), batch_size=2, cache=cache, **kw
    ), cache


def _shards(cache):
    return sorted(cache.dir.glob("shard-*.safetensors"))


def test_cached_features_equal_encoded_features_bit_for_bit(tiny_mobilenet_pth, images, tmp_path):
    backbone = _backbone(tiny_mobilenet_pth)
    plain, _ = _bank(backbone, images)
    filled, cache = _bank(backbone, images, tmp_path / "cache")
    assert len(_shards(cache)) == 1
    reread, _ = _bank(backbone, images, tmp_path / "cache")
    assert len(_shards(cache)) == 1  # nothing encoded the second time
    assert torch.equal(plain.all(), filled.all())
    assert torch.equal(plain.all(), reread.all())
    assert reread.rows == plain.rows
    # Also equal to the per-step encoder used when caching is off, given the same batches (CPU conv
    # kernels may round differently for another batch composition: that is the backbone, not the cache).
    on_the_fly = OnTheFlyFeatures(backbone, images, torch.device("cpu"))
    per_step = torch.cat([on_the_fly.lookup(torch.tensor([0, 1])), on_the_fly.lookup(torch.tensor([2]))])
    assert torch.equal(per_step, reread.all())
    other_batches = on_the_fly.lookup(torch.tensor([2, 0]))
    torch.testing.assert_close(other_batches, reread.lookup(torch.tensor([2, 0])), rtol=1e-5, atol=1e-6)


def test_preprocessing_change_uses_another_cache(tiny_mobilenet_pth, images, tmp_path):
    root = tmp_path / "cache"
    _, cache64 = _bank(_backbone(tiny_mobilenet_pth, 64), images, root)
    bank48, cache48 = _bank(_backbone(tiny_mobilenet_pth, 48), images, root)
    assert cache48.dir != cache64.dir
    assert len(_shards(cache48)) == 1
    plain48, _ = _bank(_backbone(tiny_mobilenet_pth, 48), images)
    assert torch.equal(bank48.all(), plain48.all())


def test_weight_change_uses_another_cache(tiny_mobilenet_pth, images, tmp_path):
    a = _backbone(tiny_mobilenet_pth)
    b = _backbone(tiny_mobilenet_pth)
    with torch.no_grad():
        next(b.parameters()).add_(1e-3)
    _, cache_a = _bank(a, images, tmp_path / "cache")
    _, cache_b = _bank(b, images, tmp_path / "cache")
    assert cache_a.dir != cache_b.dir


def test_changed_image_is_recomputed(tiny_mobilenet_pth, images, tmp_path):
    backbone = _backbone(tiny_mobilenet_pth)
    before, cache = _bank(backbone, images, tmp_path / "cache")
    draw_sample(tmp_path / "img1.png", "green", "rectangle")  # new content, same path
    after, _ = _bank(backbone, images, tmp_path / "cache")
    assert len(_shards(cache)) == 2  # only the changed image was encoded again
    alone = encode_images(backbone, [open_image(images[1])], torch.device("cpu"))
    assert torch.equal(after.all()[1:2], alone)
    assert not torch.equal(after.all()[1], before.all()[1])
    assert torch.equal(after.all()[0], before.all()[0])


def test_damaged_shard_is_ignored_and_recomputed(tiny_mobilenet_pth, images, tmp_path, caplog):
    backbone = _backbone(tiny_mobilenet_pth)
    good, cache = _bank(backbone, images, tmp_path / "cache")
    expected = good.all()
    shard = _shards(cache)[0]
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    with caplog.at_level("WARNING"):
        again, _ = _bank(backbone, images, tmp_path / "cache")
    assert "unreadable shard" in caplog.text and shard.name in caplog.text
    assert torch.equal(again.all(), expected)
    # The bank that was reading that shard when it was cut short says so, naming it, at its next lookup.
    with pytest.raises(DataError, match=f"feature cache shard .*{shard.name} cannot be read .*short read"):
        good.lookup(torch.tensor([0]))


def test_missing_and_broken_images_with_cache(tiny_mobilenet_pth, images, tmp_path):
    backbone = _backbone(tiny_mobilenet_pth)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    paths = [*images, str(tmp_path / "absent.png"), str(broken)]
    with pytest.raises(DataError, match="absent.png does not exist"):
        _bank(backbone, paths, tmp_path / "cache")
    bank, cache = _bank(backbone, paths, tmp_path / "cache", skip_bad=True)
    assert set(bank.bad) == {paths[3], paths[4]}
    assert list(bank.rows) == images
    # Interrupted fills leave no temporary files behind as shards.
    assert not list(cache.dir.glob("shard-*.tmp"))


def test_cache_command_fills_and_training_reads(tiny_overrides, tmp_path, capsys, caplog):
    from adaptkit.cli import main
    from adaptkit.recipes import load_recipe
    from adaptkit.train import train

    overrides = [*tiny_overrides, f"feature_cache_dir={tmp_path / 'fc'}"]
    assert main(["cache", "recipes/easyvqa_qformer_lora.yaml", *overrides]) == 0
    out = capsys.readouterr().out
    assert "6 images cached" in out
    shards = sorted((tmp_path / "fc").rglob("shard-*.safetensors"))
    assert len(shards) == 1
    with caplog.at_level("INFO", logger="adaptkit"):
        train(load_recipe("recipes/easyvqa_qformer_lora.yaml", overrides))
    assert sorted((tmp_path / "fc").rglob("shard-*.safetensors")) == shards
    log = (tmp_path / "run" / "train.log").read_text()
    assert "images: 6 read, 0 encoded" in log


def test_cache_command_refuses_memory_only_recipe(tiny_overrides, capsys):
    from adaptkit.cli import main

    assert (
        main(["cache", "recipes/easyvqa_qformer_lora.yaml", *tiny_overrides, "feature_cache_dir=none"]) == 2
    )
    assert "keeps no disk cache" in capsys.readouterr().err


def test_cache_dir_can_be_copied(tiny_mobilenet_pth, images, tmp_path):
    """Shards carry their keys, so a copied cache folder serves another machine's identical run."""
    backbone = _backbone(tiny_mobilenet_pth)
    first, cache = _bank(backbone, images, tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    second, cache_b = _bank(backbone, images, tmp_path / "b")
    assert len(_shards(cache_b)) == 1
    assert torch.equal(first.all(), second.all())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_storage_dtype_rounds_the_same_on_disk_in_memory_and_fresh(
    tiny_mobilenet_pth, images, tmp_path, dtype
):
    backbone = _backbone(tiny_mobilenet_pth)
    storage = getattr(torch, dtype)
    exact, _ = _bank(backbone, images)
    cache = FeatureCache.for_backbone(tmp_path / "cache", backbone, "cpu", storage)
    assert cache.dir != FeatureCache.for_backbone(tmp_path / "cache", backbone, "cpu").dir  # keyed by dtype
    cpu = torch.device("cpu")
    disk = FeatureBank.compute(backbone, images, {}, cpu, batch_size=2, cache=cache)
    memory = FeatureBank.compute(backbone, images, {}, cpu, batch_size=2, dtype=storage)
    shard = _shards(cache)[0]
    assert shard.stat().st_size < exact.all().numel() * 4 * 0.6  # 2 bytes a value, not 4
    rounded = exact.all().to(storage).float()
    assert not torch.equal(rounded, exact.all())
    assert torch.equal(disk.all(), rounded) and torch.equal(memory.all(), rounded)
    assert disk.lookup(torch.tensor([2, 0])).dtype == torch.float32
    on_the_fly = OnTheFlyFeatures(backbone, images, cpu, dtype=storage)
    assert torch.equal(on_the_fly.lookup(torch.tensor([0, 1])), rounded[:2])


def test_stats_accumulated_in_chunks_equal_the_whole(tiny_mobilenet_pth, images, tmp_path):
    backbone = _backbone(tiny_mobilenet_pth)
    bank, _ = _bank(backbone, images, tmp_path / "cache")
    everything = bank.all()
    flat = everything.reshape(-1, bank.shape[-1]).double()
    for chunk in (1, 2, 256):
        mean, std = bank.stats(chunk=chunk)
        torch.testing.assert_close(mean, flat.mean(0).float(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(std, flat.std(0).float(), rtol=1e-5, atol=1e-7)
    # Beyond `limit` images, evenly spaced ones (here the first and the last of three).
    mean, std = bank.stats(limit=2)
    some = everything[[0, 2]].reshape(-1, bank.shape[-1]).double()
    torch.testing.assert_close(mean, some.mean(0).float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(std, some.std(0).float(), rtol=1e-5, atol=1e-7)


def _read_rows(args):
    cache_dir, info, keys, rows = args
    return FeatureCache(cache_dir, info).stored(keys).read(torch.tensor(rows))


def test_stored_rows_are_read_on_demand_by_several_processes(tiny_mobilenet_pth, images, tmp_path):
    import multiprocessing

    backbone = _backbone(tiny_mobilenet_pth)
    bank, cache = _bank(backbone, images, tmp_path / "cache")
    assert not isinstance(bank.source, torch.Tensor)  # nothing held: rows are read per lookup
    expected = bank.all()
    keys = list(cache._index)  # every cached key, in the order they were written
    store = cache.stored(keys)
    rows = [[2, 0, 2], [1], []]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        got = pool.map(_read_rows, [(tmp_path / "cache", cache.info, keys, r) for r in rows])
    for r, tensor in zip(rows, got):
        assert torch.equal(tensor, store.read(torch.tensor(r, dtype=torch.int64)))
    assert torch.equal(store.read(torch.arange(3)), expected[[bank.rows[p] for p in images]])


def test_compiled_encoding_is_used_where_it_pays_and_matches_eager(
    tiny_mobilenet_pth, images, tmp_path, monkeypatch, caplog
):
    from adaptkit.data import encoding

    backbone = _backbone(tiny_mobilenet_pth)
    eager, _ = _bank(backbone, images)
    # Below COMPILE_MIN_IMAGES a compile would cost more than it saves: eager, bit for bit.
    small, _ = _bank(backbone, images, compile=True)
    assert torch.equal(small.all(), eager.all())
    monkeypatch.setattr(encoding, "COMPILE_MIN_IMAGES", 3)
    # One graph for every batch: the padded last batch must not recompile (layouts included).
    with (
        torch._dynamo.config.patch(error_on_recompile=True),
        caplog.at_level("INFO", logger="adaptkit.data.encoding"),
    ):
        compiled, cache = _bank(backbone, images, tmp_path / "cache", compile=True)
    assert "compiled the vision backbone for batches of 2 images" in caplog.text
    # Batches of 2, the last (one image) padded to 2: same rows, features within float32 rounding.
    assert compiled.rows == eager.rows
    torch.testing.assert_close(compiled.all(), eager.all(), rtol=1e-4, atol=1e-4)
    assert not torch.equal(compiled.all(), eager.all())  # it did run the compiled kernels
    reread, _ = _bank(backbone, images, tmp_path / "cache", compile=True)
    assert torch.equal(reread.all(), compiled.all())  # the cache keeps what was encoded


def test_compile_failure_falls_back_to_eager(tiny_mobilenet_pth, images, monkeypatch, caplog):
    from adaptkit.data import encoding

    def broken(*args, **kwargs):
        def graph(pixels):
            raise RuntimeError("InductorError: no C++ compiler found")

        return graph

    backbone = _backbone(tiny_mobilenet_pth)
    eager, _ = _bank(backbone, images)
    monkeypatch.setattr(encoding, "COMPILE_MIN_IMAGES", 0)
    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level("WARNING", logger="adaptkit.data.encoding"):
        fallback, _ = _bank(backbone, images, compile=True)
    assert "compiling the vision backbone failed, encoding eager instead" in caplog.text
    assert "no C++ compiler" in caplog.text
    assert torch.equal(fallback.all(), eager.all())
