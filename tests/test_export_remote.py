"""``adaptkit export --format hf-remote-code``: runs of every adapter kind and entry layer, on torchvision,
timm, open_clip and transformers towers and Llama / Gemma-3 LMs, VQA and captioning, in 32 and 16 bits,
become folders that a fresh process without adaptkit loads with ``AutoModelForImageTextToText`` +
``AutoProcessor`` (``trust_remote_code=True``) and that answer as the run did, logits within the merge's
tolerance of adaptkit's; their ``generate`` picks what their own full forward pass picks; runs the format
cannot carry are refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from adaptkit.artifacts import ExportError
from adaptkit.export_remote import export_remote, problems
from adaptkit.recipes import load_recipe
from adaptkit.train import train
from tests.conftest import AT_INPUT, overrides_for, retrieval_overrides, save_tiny_gemma3

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "easyvqa_qformer_lora.yaml"
CAPTION = RECIPE.with_name("easyvqa_caption_lora.yaml")
RETRIEVAL = RECIPE.with_name("easyvqa_retrieval.yaml")
FAST = ["lora.start_step=0", "lr_lora=0.02", "lr_adapter=0.01", "max_steps=40", "eval_every=0"]


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("remote_gemma")
    return save_tiny_gemma3(root / "gemma3", ["sliding_attention", "full_attention"])


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory) -> Path:
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    root = tmp_path_factory.mktemp("remote_siglip")
    torch.manual_seed(0)
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 48, "intermediate_size": 64}
    SiglipVisionModel(
        SiglipVisionConfig(**vision, num_hidden_layers=2, num_attention_heads=4)
    ).save_pretrained(root)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root)
    return root


def _run(root: Path, base: list[str], extra: list[str]) -> Path:
    train(load_recipe(RECIPE, base + FAST + extra))
    return root / "run"


def _export(run: Path, out: Path) -> dict:
    report = export_remote(run, out, verify_samples=6)
    assert (out / "modeling_adaptkit.py").is_file() and not out.with_name(out.name + ".partial").exists()
    assert report["passed"] and report["prompts_identical"] and report["answers_identical"] == 1.0
    assert report["max_abs_logit_diff"] <= 1e-4
    assert "adaptkit not importable" in report["loaded_with"]
    return report


def _decode_path_matches_full_forward(export: Path, image: Path) -> None:
    """The folder's ``generate`` (key/value cache, ``pixel_values`` only at the prompt for soft tokens), on
    left-padded rows and on a row alone (whose all-ones mask generate drops), picks the tokens its own full
    forward pass picks, EOS ignored so every step runs."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(export, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(export, trust_remote_code=True)
    texts = ["<image>what is the shape?", "<image>is there a red shape in the image?"]
    pil = Image.open(image)
    inputs = processor(images=[pil, pil], text=texts)
    assert inputs["attention_mask"][0, 0] == 0  # the shorter prompt is left-padded
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
        out = out[:, inputs["input_ids"].shape[1] :]
        for row, text in enumerate(texts):
            one = processor(images=[pil], text=[text])
            ids, px = one["input_ids"], one["pixel_values"]
            for _ in range(4):
                token = model(input_ids=ids, pixel_values=px).logits[0, -1].argmax()
                ids = torch.cat([ids, token.view(1, 1)], dim=1)
            assert out[row].tolist() == ids[0, -4:].tolist()
            alone = model.generate(**one, max_new_tokens=4, do_sample=False, pad_token_id=0)  # no padding
            assert alone[0, -4:].tolist() == ids[0, -4:].tolist()


CASES = {
    # the shipped recipe's path, scaled down: Q-Former soft tokens entering layer 1 behind the sink token
    "qformer_layer1": [],
    "qformer_prompt_conditioned_at_input": AT_INPUT,
    "resampler_layer1": ["adapter.kind=resampler"],
    "projector_pooled_at_input": [
        "adapter.kind=projector",
        "adapter.inject_layer=0",
        "adapter.projector.pool_tokens=4",
    ],
    "xattn_resampler": [
        "adapter.kind=xattn",
        "adapter.inject_layer=0",
        "adapter.xattn.layers=[1]",
        "adapter.xattn.resampler=true",
    ],
    "xattn_layer0": ["adapter.kind=xattn", "adapter.inject_layer=0", "adapter.xattn.layers=[0,1]"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_mobilenet_llama_runs_load_without_adaptkit(
    case, tiny_lm_dir, tiny_mobilenet_pth, tiny_vqa, tmp_path
):
    run = _run(tmp_path, overrides_for(tiny_lm_dir, tiny_mobilenet_pth, tiny_vqa, tmp_path), CASES[case])
    _export(run, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model_type"] == "adaptkit"
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_adaptkit.AdaptkitForImageTextToText"
    _decode_path_matches_full_forward(tmp_path / "export", tiny_vqa.parent / "images" / "0.png")


def test_timm_tower_and_gemma3(gemma_dir, tiny_mobilenet_pth, tiny_vqa, tmp_path):
    """A random timm CNN's tokens into a Gemma-3 LM (sliding-window layers, tied embeddings) at layer 1."""
    base = overrides_for(gemma_dir, tiny_mobilenet_pth, tiny_vqa, tmp_path)
    tower = ["vision.family=timm", "vision.name=mobilenetv3_small_050", "vision.weights=random"]
    _export(_run(tmp_path, base, tower), tmp_path / "export")
    _decode_path_matches_full_forward(tmp_path / "export", tiny_vqa.parent / "images" / "0.png")


def test_siglip_tower_projector_at_input(siglip_dir, tiny_lm_dir, tiny_mobilenet_pth, tiny_vqa, tmp_path):
    """A transformers SigLIP tower (its own image processor) and LLaVA's projector at the LM's input."""
    base = overrides_for(tiny_lm_dir, tiny_mobilenet_pth, tiny_vqa, tmp_path)
    extra = [
        "vision.family=hf",
        f"vision.name={siglip_dir}",
        "vision.image_size=32",
        "adapter.kind=projector",
        "adapter.inject_layer=0",
    ]
    _export(_run(tmp_path, base, extra), tmp_path / "export")
    reads = json.loads((tmp_path / "export" / "processor_config.json").read_text())["tower"]
    assert reads["image_processor"]["class"].startswith("Siglip")


def test_open_clip_tower(tiny_lm_dir, tiny_mobilenet_pth, tiny_vqa, tmp_path):
    """A random open_clip ViT (an architecture open_clip knows only through this process's registration: the
    fresh process builds it from the config the export writes) and its evaluation transform."""
    import open_clip
    from safetensors.torch import save_file

    arch = "adaptkit-remote-tiny-vit"
    vision = {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 8}
    text = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 4, "layers": 1}
    (tmp_path / f"{arch}.json").write_text(
        json.dumps({"embed_dim": 16, "vision_cfg": vision, "text_cfg": text})
    )
    open_clip.add_model_config(tmp_path / f"{arch}.json")
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in open_clip.create_model(arch).state_dict().items()}, str(ckpt))
    base = overrides_for(tiny_lm_dir, tiny_mobilenet_pth, tiny_vqa, tmp_path)
    tower = [
        "vision.family=open_clip",
        f"vision.name={arch}",
        f"vision.weights={ckpt}",
        "vision.image_size=32",
    ]
    _export(_run(tmp_path, base, tower), tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["vision"]["open_clip"]["vision_cfg"] == vision
    reads = json.loads((tmp_path / "export" / "processor_config.json").read_text())["tower"]
    assert reads["preprocess"]["size"] in (32, [32, 32])
    _decode_path_matches_full_forward(tmp_path / "export", tiny_vqa.parent / "images" / "0.png")


def test_caption_run(tiny_lm_dir, tiny_mobilenet_pth, tiny_text_encoder_dir, tiny_captions, tmp_path):
    """A caption run (Q-Former at the LM's input, the recipe's caption prompt): the folder captions as the
    run does; its chat template gives the trained prompt when the user's turn has only the image, and the
    user's own prompt (whitespace joined, as the predictor's) when it has text."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from adaptkit.inference import load_for_inference

    base = retrieval_overrides(
        tiny_lm_dir, tiny_mobilenet_pth, tiny_text_encoder_dir, tiny_captions, tmp_path
    )
    base = [o for o in base if not o.startswith(("text_encoder.", "objectives."))]
    lora = ["lora.r=4", "lora.alpha=8", "lora.target_modules=[q_proj,v_proj]", "max_new_tokens=6"]
    train(load_recipe(CAPTION, base + FAST + lora))
    report = _export(tmp_path / "run", tmp_path / "export")
    assert report["data"] == str(tiny_captions)
    processor = AutoProcessor.from_pretrained(tmp_path / "export", trust_remote_code=True)
    image_only = [{"role": "user", "content": [{"type": "image"}]}]
    assert processor.apply_chat_template(image_only, add_generation_prompt=True) == "<image>A short caption:"
    asked = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " Describe\n it: "}]}]
    assert processor.apply_chat_template(asked, add_generation_prompt=True) == "<image>Describe it:"
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "export", trust_remote_code=True).eval()
    predictor = load_for_inference(tmp_path / "run", "cpu")
    for k in range(3):  # images the check may not have held
        image = tiny_captions.parent / "images" / f"{k}.png"
        inputs = processor(images=[Image.open(image)], text=["<image>A short caption:"])
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        caption = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        assert caption == predictor.caption(str(image)).text


@pytest.mark.parametrize("text_lora", [False, True])
def test_retrieval_run(
    siglip_dir, tiny_lm_dir, tiny_mobilenet_pth, tiny_text_encoder_dir, tiny_captions, tmp_path, text_lora
):
    """A retrieval run (a random SigLIP tower: the tiny random MobileNet's features hardly differ between
    images; Q-Former, ITC + ITM; with and without LoRA in the text encoder) as ``AutoModel`` with CLIP's
    interface: the fresh process scores the held captions as the run does, and in this process its
    probabilities over texts of our own, which differ between images, are the predictor's."""
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    from adaptkit.inference import load_for_inference

    base = retrieval_overrides(
        tiny_lm_dir, tiny_mobilenet_pth, tiny_text_encoder_dir, tiny_captions, tmp_path
    )
    extra = [
        "max_steps=60",
        "lr_adapter=0.01",
        "objectives.itm=1",
        "vision.family=hf",
        f"vision.name={siglip_dir}",
    ]
    extra += ["vision.image_size=32"]
    extra += ["text_encoder.lora_r=4", "text_encoder.lora_alpha=8"] if text_lora else []
    train(load_recipe(RETRIEVAL, base + extra))
    report = export_remote(tmp_path / "run", tmp_path / "export", verify_samples=6)
    assert report["passed"] and report["prompts_identical"] and report["answers_identical"] == 1.0
    assert report["max_abs_logit_diff"] <= 1e-4 and report["samples"] == 6
    assert (
        report["loaded_with"].startswith("transformers.AutoModel ")
        and "adaptkit not importable" in report["loaded_with"]
    )
    model = AutoModel.from_pretrained(tmp_path / "export", trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "export", trust_remote_code=True)
    predictor = load_for_inference(tmp_path / "run", "cpu")
    texts = ["a red circle", "a  blue square", "green", "a gray triangle in the middle"]
    seen = []
    for k in range(3):
        image = tiny_captions.parent / "images" / f"{k}.png"
        with torch.no_grad():
            probs = model(**processor(images=[Image.open(image)], text=texts)).logits_per_image.softmax(-1)[0]
        want = {" ".join(t.split()): p for t, p in predictor.rank_texts(str(image), texts)}
        assert {" ".join(t.split()): float(p) for t, p in zip(texts, probs)} == pytest.approx(want, abs=1e-5)
        seen.append(probs)
    assert not torch.allclose(seen[0], seen[1], atol=1e-4)  # the image matters to the scores compared
    if not text_lora:  # the same run in bfloat16: loaded in it, held to the 16-bit bounds
        from adaptkit.export import MIN_AGREEMENT_16BIT, TOLERANCE

        half = export_remote(tmp_path / "run", tmp_path / "bf16", dtype="bfloat16", verify_samples=6)
        assert half["passed"] and half["prompts_identical"] and "(bfloat16)" in half["loaded_with"]
        assert half["answers_identical"] >= MIN_AGREEMENT_16BIT
        assert 0 < half["max_abs_logit_diff"] <= TOLERANCE["bfloat16"]
        assert _tensor_kinds(tmp_path / "bf16") - {"I64"} == {"BF16"}


def test_refuses_what_it_cannot_carry(tiny_run, tmp_path, monkeypatch):
    assert problems(load_recipe(RETRIEVAL)) == []
    assert problems(load_recipe(RECIPE)) == []  # the shipped default exports
    quantized = load_recipe(RECIPE, ["vision.family=hf", "vision.name=any/siglip", "vision.quant=8bit"])
    assert any(p.startswith("vision.quant=8bit") for p in problems(quantized))
    with pytest.raises(ExportError, match="vision.quant=8bit"), monkeypatch.context() as patch:
        patch.setattr("adaptkit.export_remote.problems", lambda recipe: problems(quantized))
        export_remote(tiny_run, tmp_path / "out")  # refused before anything is written
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.fixture(scope="module")
def answering_run(tiny_lm_dir, tiny_mobilenet_pth, tiny_vqa, tmp_path_factory) -> Path:
    """The tiny default-path run trained until it answers (tiny_run stops at once)."""
    root = tmp_path_factory.mktemp("remote_answering")
    return _run(root, overrides_for(tiny_lm_dir, tiny_mobilenet_pth, tiny_vqa, root), ["max_steps=150"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_folders(answering_run, tmp_path, dtype):
    """--dtype bfloat16 / float16: every weight saved in it; the fresh process loads the folder in it, and the
    answers and logits hold to the 16-bit bounds the adaptkit format's export uses."""
    from adaptkit.export import MIN_AGREEMENT_16BIT, TOLERANCE

    report = export_remote(answering_run, tmp_path / "export", dtype=dtype, verify_samples=8)
    assert sum(bool(a) for a in report["answers"]) >= 4  # answers, not stops, are compared
    assert report["passed"] and report["dtype"] == dtype and report["prompts_identical"]
    assert report["answers_identical"] >= MIN_AGREEMENT_16BIT
    assert 0 < report["max_abs_logit_diff"] <= TOLERANCE[dtype]  # rounded, so never exact
    assert f"({dtype})" in report["loaded_with"]
    # I64: batch-norm step counts
    assert _tensor_kinds(tmp_path / "export") - {"I64"} == {"BF16" if dtype == "bfloat16" else "F16"}


def _tensor_kinds(folder: Path) -> set[str]:
    """The dtypes of the tensors in an export folder's ``model.safetensors``."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (a method, not a dict)


def test_modeling_files_need_no_adaptkit():
    """The files that travel import torch, transformers and the towers' libraries only."""
    import ast

    from adaptkit.export_remote import FILES, REMOTE_DIR
    from adaptkit.export_remote_retrieval import FILES as RETRIEVAL_FILES

    for name in set(FILES + RETRIEVAL_FILES):
        tree = ast.parse((REMOTE_DIR / name).read_text())
        modules = {
            node.module if isinstance(node, ast.ImportFrom) else alias.name
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0)
            for alias in node.names
        }
        local = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
        assert {f"{m}.py" for m in local} <= set(FILES + RETRIEVAL_FILES)  # files that travel beside it
        third_party = {m.split(".")[0] for m in modules if m} - set(sys.stdlib_module_names)
        assert third_party <= {"torch", "transformers", "torchvision", "timm", "open_clip", "PIL"}, (
            third_party
        )
