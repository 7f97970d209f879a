from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from adaptkit.backbones.vision import build_vision_backbone
from adaptkit.config import VisionConfig


def _images(n=2, size=48):
    return [Image.new("RGB" if i % 2 == 0 else "L", (size, size + 8 * i), 120 + 40 * i) for i in range(n)]


def _check(backbone, expected_dim):
    feats = backbone(backbone.preprocess(_images()))
    assert feats.ndim == 3 and feats.shape[0] == 2 and feats.shape[2] == expected_dim == backbone.feature_dim
    assert feats.shape[1] >= 1 and feats.shape[1] == backbone.num_tokens  # adapters are sized by num_tokens
    assert all(not p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training
    return feats


def test_torchvision_from_pth_and_safetensors(tiny_mobilenet_pth, tmp_path):
    cfg = VisionConfig(
        family="torchvision", name="mobilenet_v2", weights=str(tiny_mobilenet_pth), image_size=64
    )
    feats = _check(build_vision_backbone(cfg), 1280)
    assert feats.shape[1] == 4  # 64 px / 32 stride -> 2x2 grid
    from safetensors.torch import save_file

    state = torch.load(tiny_mobilenet_pth, weights_only=True)
    st = tmp_path / "mnv2.safetensors"
    save_file(state, str(st))
    again = build_vision_backbone(VisionConfig(weights=str(st), image_size=64))
    torch.testing.assert_close(again(again.preprocess(_images())), feats)


def test_torchvision_feature_layer_and_bad_names(tiny_mobilenet_pth):
    mid = build_vision_backbone(
        VisionConfig(weights=str(tiny_mobilenet_pth), image_size=64, feature_layer=-2)
    )
    assert mid.feature_dim == 320
    multi = build_vision_backbone(
        VisionConfig(weights=str(tiny_mobilenet_pth), image_size=64, extra_layers=[6, 13])
    )
    feats = multi(multi.preprocess(_images()))
    assert feats.shape == (2, 4, 32 + 96 + 1280) and multi.feature_dim == 32 + 96 + 1280
    last = build_vision_backbone(VisionConfig(weights=str(tiny_mobilenet_pth), image_size=64))
    torch.testing.assert_close(feats[..., -1280:], last(last.preprocess(_images())))
    with pytest.raises(ValueError, match="extra_layers"):
        build_vision_backbone(VisionConfig(weights=str(tiny_mobilenet_pth), extra_layers=[18]))
    with pytest.raises(ValueError, match="no model"):
        build_vision_backbone(VisionConfig(name="not_a_net", weights="random"))
    with pytest.raises(ValueError, match="feature_layer"):
        build_vision_backbone(VisionConfig(weights=str(tiny_mobilenet_pth), feature_layer=99))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_vision_backbone(VisionConfig(weights="/nonexistent/w.pth"))


def test_embedded_mobilenet_loads_all_keys():
    backbone = build_vision_backbone(VisionConfig())  # strict=True load of the packaged ImageNet weights
    feats = _check(backbone, 1280)
    assert feats.shape[1] == 49  # 224 px -> 7x7 grid


def test_hf_vit(tmp_path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    cfg = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
    )
    ViTModel(cfg).save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    feats = _check(build_vision_backbone(VisionConfig(family="hf", name=str(tmp_path))), 32)
    assert feats.shape[1] == 1 + 16  # CLS + 4x4 patches


def test_hf_clip_vision_tower(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    cfg = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "vocab_size": 99,
            "max_position_embeddings": 16,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 48,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path
    )
    backbone = build_vision_backbone(VisionConfig(family="hf", name=str(tmp_path), feature_layer=-2))
    assert _check(backbone, 48).shape[1] == 17


def test_open_clip_vit(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    arch = "adaptkit-test-tiny-vit"
    (tmp_path / f"{arch}.json").write_text(
        json.dumps(
            {
                "embed_dim": 16,
                "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 8},
                "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 4, "layers": 1},
            }
        )
    )
    open_clip.add_model_config(tmp_path / f"{arch}.json")
    model = open_clip.create_model(arch)
    ckpt = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    backbone = build_vision_backbone(VisionConfig(family="open_clip", name=arch, weights=str(ckpt)))
    feats = _check(backbone, 32)
    assert feats.shape[1] == 16
    torch.testing.assert_close(backbone.visual.conv1.weight, model.visual.conv1.weight)
    with pytest.raises(FileNotFoundError, match="neither a file nor a pretrained tag"):
        build_vision_backbone(VisionConfig(family="open_clip", name=arch, weights="/no/such.pt"))
