"""The backbone files an export folder carries (``adaptkit export``): the vision weights and the text
encoder, or, for the embedded assets, their package, file and sha256 in the manifest."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from adaptkit.assets import ASSETS


def _embedded(name: str) -> dict:
    asset = ASSETS[name]
    return {"package": f"{asset.dist}=={asset.version}", "files": dict(asset.files)}


def copy_vision(recipe, out: Path) -> tuple[object, dict]:
    """Put the vision weights into ``out/vision`` (or name the embedded asset); returns (config, info)."""
    cfg = recipe.vision
    info: dict = {"family": cfg.family, "name": cfg.name, "weights": cfg.weights}
    if cfg.family == "torchvision" and cfg.weights == "embedded":
        asset = ASSETS["mobilenet_v2"]
        ((rel, sha),) = asset.files.items()
        info["embedded_asset"] = {"package": f"{asset.dist}=={asset.version}", "file": rel, "sha256": sha}
        return cfg, info
    target = out / "vision"
    target.mkdir()
    if cfg.family == "hf":
        from transformers import AutoImageProcessor, AutoModel

        AutoModel.from_pretrained(cfg.name).save_pretrained(target)
        AutoImageProcessor.from_pretrained(cfg.name).save_pretrained(target)
        return dataclasses.replace(cfg, name="vision"), info
    if cfg.weights in ("", "none", "random"):
        return cfg, info
    source = Path(cfg.weights)
    if not source.is_file():  # an open_clip pretrained tag: the manifest names it
        return cfg, info
    if cfg.family == "torchvision" and source.suffix != ".safetensors":
        from safetensors.torch import save_file

        from adaptkit.backbones.vision import load_state_dict

        state = {k: v.contiguous() for k, v in load_state_dict(str(source)).items()}
        save_file(state, str(target / "weights.safetensors"))
        rel = "vision/weights.safetensors"
    else:
        rel = f"vision/{source.name}"
        shutil.copy2(source, out / rel)
    return dataclasses.replace(cfg, weights=rel), info


def copy_text_encoder(recipe, out: Path, run: Path | None = None) -> tuple[object, dict]:
    """Put the text encoder into ``out/text_encoder`` (or name the embedded asset); returns (config, info)
    (``info`` empty when the recipe has no text encoder). A run whose text encoder trained LoRA
    (``text_lora.safetensors`` in ``run``) gets the encoder with LoRA merged into its weights."""
    cfg = recipe.text_encoder
    if cfg.name in ("", "none"):
        return cfg, {}
    info: dict = {"name": cfg.name, "max_length": cfg.max_length}
    if cfg.lora_r > 0:
        from safetensors.torch import load_file

        from adaptkit.artifacts import TEXT_LORA_FILE
        from adaptkit.backbones.text import TextEncoder

        encoder = TextEncoder(cfg)
        encoder.load_lora_state(load_file(str(run / TEXT_LORA_FILE)), str(run / TEXT_LORA_FILE))
        encoder.merged().save_pretrained(out / "text_encoder", safe_serialization=True)
        encoder.tokenizer.save_pretrained(out / "text_encoder")
        info["lora_merged"] = {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "from": TEXT_LORA_FILE}
        return dataclasses.replace(cfg, name="text_encoder", lora_r=0), info
    if cfg.name.startswith("embedded:"):
        info["embedded_asset"] = _embedded(cfg.name.split(":", 1)[1])
        return cfg, info
    from transformers import AutoModel, AutoTokenizer

    from adaptkit.backbones.text import resolve_text_encoder_path

    path = resolve_text_encoder_path(cfg.name)
    AutoModel.from_pretrained(path).save_pretrained(out / "text_encoder", safe_serialization=True)
    AutoTokenizer.from_pretrained(path).save_pretrained(out / "text_encoder")
    return dataclasses.replace(cfg, name="text_encoder"), info
