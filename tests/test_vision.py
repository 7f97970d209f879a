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


@pytest.fixture(scope="module")
def timm_cnn_pth(tmp_path_factory):
    """A random timm test EfficientNet saved as a .pth state dict."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet")
    path = tmp_path_factory.mktemp("timm") / "test_efficientnet.pth"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def test_timm_cnn_tokens_are_forward_features_grid(timm_cnn_pth):
    path, model = timm_cnn_pth
    cfg = VisionConfig(family="timm", name="test_efficientnet", weights=str(path), image_size=64)
    backbone = build_vision_backbone(cfg)
    feats = _check(backbone, model.num_features)
    pixels = backbone.preprocess(_images())
    with torch.no_grad():
        grid = model.forward_features(pixels)
    assert feats.shape[1] == grid.shape[-2] * grid.shape[-1]
    torch.testing.assert_close(feats, grid.flatten(2).transpose(1, 2))
    # The model's own pretrained preprocessing at image_size (timm's eval transform: resize, crop, normalise).
    assert pixels.shape[-2:] == (64, 64)
    assert backbone.identity.startswith(f"timm:test_efficientnet:{path}:layer-1:size64")


def test_timm_extra_and_intermediate_layers(timm_cnn_pth):
    path, model = timm_cnn_pth
    base = {"family": "timm", "name": "test_efficientnet", "weights": str(path), "image_size": 64}
    last = build_vision_backbone(VisionConfig(**base))
    multi = build_vision_backbone(VisionConfig(**base, extra_layers=[1, 2]))
    pixels = last.preprocess(_images())
    with torch.no_grad():
        stages = model.forward_intermediates(pixels, indices=[1, 2], intermediates_only=True)
    widths = [s.shape[1] for s in stages]
    feats = multi(pixels)
    assert feats.shape == (2, last.num_tokens, sum(widths) + last.feature_dim)
    torch.testing.assert_close(feats[..., -last.feature_dim :], last(pixels))
    mid = build_vision_backbone(VisionConfig(**base, feature_layer=2))
    assert mid.feature_dim == widths[1] and mid.num_tokens >= last.num_tokens  # an earlier, finer grid
    with pytest.raises(ValueError, match="must lie before feature_layer"):
        build_vision_backbone(VisionConfig(**base, feature_layer=1, extra_layers=[2]))
    with pytest.raises(ValueError, match=r"\[6, 13\]: timm 'test_efficientnet' has no such stage"):
        build_vision_backbone(VisionConfig(**base, extra_layers=[6, 13]))


def test_timm_state_dict_under_other_names_loads_by_order_and_shape(timm_cnn_pth, tmp_path, caplog):
    path, model = timm_cnn_pth
    state = torch.load(path, weights_only=True)
    renamed = {f"port.{i}": v for i, (k, v) in enumerate(state.items()) if "num_batches_tracked" not in k}
    other = tmp_path / "ported.pth"
    torch.save(renamed, other)
    cfg = {"family": "timm", "name": "test_efficientnet", "image_size": 64}
    with caplog.at_level("INFO", logger="adaptkit.backbones.timm_vision"):
        ported = build_vision_backbone(VisionConfig(**cfg, weights=str(other)))
    assert "matched in order and shape" in caplog.text
    reference = build_vision_backbone(VisionConfig(**cfg, weights=str(path)))
    pixels = reference.preprocess(_images())
    torch.testing.assert_close(ported(pixels), reference(pixels))
    # A tensor of another shape (a different network) is refused, naming both tensors.
    keys = list(renamed)
    swapped = dict(renamed)
    swapped[keys[0]], swapped[keys[1]] = renamed[keys[1]], renamed[keys[0]]
    torch.save(swapped, tmp_path / "swapped.pth")
    with pytest.raises(ValueError, match="does not fit this timm model: port.0 has shape"):
        build_vision_backbone(VisionConfig(**cfg, weights=str(tmp_path / "swapped.pth")))
    torch.save(dict(list(renamed.items())[:-1]), tmp_path / "short.pth")
    with pytest.raises(ValueError, match="is it a checkpoint of vision.name"):
        build_vision_backbone(VisionConfig(**cfg, weights=str(tmp_path / "short.pth")))


def test_timm_vit_tokens_and_bad_names():
    backbone = build_vision_backbone(
        VisionConfig(family="timm", name="test_vit", weights="random", image_size=160)
    )
    feats = _check(backbone, backbone.model.num_features)
    prefix = backbone.model.num_prefix_tokens
    assert feats.shape[1] == prefix + (160 // backbone.model.patch_embed.patch_size[0]) ** 2
    with pytest.raises(ValueError, match=r"image_size=64: timm 'vit_tiny_patch16_224' takes 224x224 .*=224"):
        build_vision_backbone(
            VisionConfig(family="timm", name="vit_tiny_patch16_224", weights="random", image_size=64)
        )
    with pytest.raises(ValueError, match="timm has no model 'not_a_timm_net'"):
        build_vision_backbone(VisionConfig(family="timm", name="not_a_timm_net", weights="random"))
    with pytest.raises(ValueError, match="embedded exists for vision.family=timm only"):
        build_vision_backbone(VisionConfig(family="timm", name="test_vit", weights="embedded"))
    with pytest.raises(ValueError, match="could not load pretrained"):
        build_vision_backbone(VisionConfig(family="timm", name="test_vit", weights="no_such_tag"))


def _real_photos() -> dict[str, int]:
    """Real photos other packages ship, with their ImageNet class: cheetah (293), military uniform (652)."""
    from pathlib import Path

    import gradio
    import matplotlib

    gradio_dir, mpl_dir = Path(gradio.__file__).parent, Path(matplotlib.get_data_path())
    return {
        str(gradio_dir / "media_assets/images/cheetah.jpg"): 293,
        str(gradio_dir / "test_data/cheetah2.jpg"): 293,
        str(mpl_dir / "sample_data/grace_hopper.jpg"): 652,
    }


def test_embedded_efficientnet_lite0_names_real_photos():
    """The packaged EfficientNet-Lite0, its tensors matched to timm's by order and shape, classifies real
    photos as ImageNet does: the port is the real network, not a shuffled one."""
    backbone = build_vision_backbone(VisionConfig(family="timm", name="tf_efficientnet_lite0"))
    assert backbone.feature_dim == 1280 and backbone.num_tokens == 49  # 224 px -> 7x7 grid
    photos = _real_photos()
    pixels = backbone.preprocess([Image.open(p) for p in photos])
    with torch.no_grad():
        top3 = backbone.model(pixels).topk(3).indices.tolist()
    # Both cheetahs top-1; Grace Hopper's portrait: "military uniform" among the first three (the top one is
    # "academic gown"; the embedded MobileNetV2 says "bow tie", also with the uniform third).
    assert [t[0] for t in top3[:2]] == [293, 293]
    assert 652 in top3[2]


def test_a_run_trains_and_answers_on_a_timm_backbone(tiny_overrides, tiny_vqa, tmp_path):
    from adaptkit.cli import main
    from adaptkit.inference import load_for_inference

    timm = ["vision.family=timm", "vision.name=test_efficientnet", "vision.weights=random"]
    assert main(["train", "recipes/easyvqa_qformer_lora.yaml", *tiny_overrides, *timm]) == 0
    run = tmp_path / "run"
    predictor = load_for_inference(run, "cpu")
    assert predictor.model.vision.identity.startswith("timm:test_efficientnet:random")
    assert main(["eval", str(run), "--data", str(tiny_vqa)]) == 0
