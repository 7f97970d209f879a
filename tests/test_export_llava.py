"""``adaptkit export --format hf-llava``: projector runs on random CLIP and SigLIP towers x Llama, Qwen2 and
Gemma-3 LMs become stock transformers LLaVA folders, which a fresh process without adaptkit loads with
``LlavaForConditionalGeneration`` + ``AutoProcessor`` and which answer as the run did; runs the class cannot
express are refused with the recipe keys that would make them expressible."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adaptkit.artifacts import ExportError
from adaptkit.export_llava import chat_template, export_llava, fold_standardisation, problems
from adaptkit.recipes import load_recipe
from adaptkit.train import train
from tests.conftest import overrides_for, save_tiny_gemma3, save_tiny_lm

RECIPE = "recipes/easyvqa_projector_lora.yaml"


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> dict[str, Path]:
    """A dual CLIP model (its vision half is the tower; 16 patches + CLS) and a SigLIP vision model (16
    patches, no CLS), random, 32 px, with their image processors."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        SiglipImageProcessor,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    root = tmp_path_factory.mktemp("llava_towers")
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 48, "intermediate_size": 64}
    vision |= {"num_hidden_layers": 2, "num_attention_heads": 4}
    torch.manual_seed(0)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
    clip = CLIPConfig(text_config=text | {"vocab_size": 99}, vision_config=vision, projection_dim=16)
    CLIPModel(clip).save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "clip"
    )
    SiglipVisionModel(SiglipVisionConfig(**vision)).save_pretrained(root / "siglip")
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "siglip")
    return {"clip": root / "clip", "siglip": root / "siglip"}


@pytest.fixture(scope="module")
def lms(tmp_path_factory) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("llava_lms")
    kinds = ["sliding_attention", "full_attention"]
    return {
        "llama": save_tiny_lm(root / "llama", LlamaForCausalLM, LlamaConfig, num_hidden_layers=2),
        "qwen2": save_tiny_lm(
            root / "qwen2", Qwen2ForCausalLM, Qwen2Config, num_hidden_layers=2, tie_word_embeddings=True
        ),
        "gemma3": save_tiny_gemma3(root / "gemma3", kinds),
    }


def _train(tower: Path, lm: Path, vqa: Path, root: Path, extra=()) -> Path:
    overrides = [
        o for o in overrides_for(lm, Path("unused"), vqa, root) if not o.startswith(("vision.", "adapter."))
    ]
    overrides += [
        "vision.family=hf",
        f"vision.name={tower}",
        "vision.feature_layer=-2",
        "adapter.kind=projector",
        "adapter.inject_layer=0",
        "lora.start_step=0",
        "lr_lora=0.02",
        "max_steps=150",
        "eval_every=0",
        "checkpoint_every=0",
        *extra,
    ]
    train(load_recipe(RECIPE, overrides))
    return root / "run"


def _stock_answers(out: Path, image: Path, question: str | None) -> str:
    """What a user's script, in a process where adaptkit cannot be imported, gets from the folder."""
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "adaptkit":
            raise ImportError("no adaptkit here")
sys.meta_path.insert(0, Block())
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
model = LlavaForConditionalGeneration.from_pretrained({str(out)!r})
processor = AutoProcessor.from_pretrained({str(out)!r})
parts = [{{"type": "image"}}] + ([{{"type": "text", "text": {question!r}}}] if {question!r} else [])
messages = [{{"role": "user", "content": parts}}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=Image.open({str(image)!r}).convert("RGB"), text=text, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
"""
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


@pytest.mark.parametrize(
    ("tower", "lm"), [("clip", "llama"), ("siglip", "qwen2"), ("clip", "gemma3"), ("siglip", "llama")]
)
def test_projector_runs_export_to_stock_llava_and_answer_as_the_run(
    towers, lms, tiny_vqa, tmp_path, tower, lm
):
    from adaptkit.inference import load_for_inference

    run = _train(towers[tower], lms[lm], tiny_vqa, tmp_path)
    out = tmp_path / "llava"
    report = export_llava(run, out, verify_samples=12)
    assert report["passed"] and report["prompts_identical"] and report["answers_identical"] == 1.0
    assert report["max_abs_logit_diff"] <= 1e-4 and report["samples"] == 12
    if lm != "qwen2":  # the tiny random Qwen2 learns to stop at once in these steps (tied or not; Llama,
        # Gemma-3 answer): its answers compare stops only, and its logits check is what holds it
        assert sum(bool(a) for a in report["answers"]) >= 4
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava" and config["vision_feature_select_strategy"] == "full"
    assert config["image_seq_length"] == (17 if tower == "clip" else 16)
    assert config["vision_feature_layer"] == -2 and config["projector_hidden_act"] == "gelu"
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))
    assert not (tmp_path / "llava.partial").exists()
    # A user's own script, adaptkit not importable, gets the run's answer.
    sample = json.loads(tiny_vqa.read_text().splitlines()[0])
    want = load_for_inference(run).predict(str(tiny_vqa.parent / sample["image"]), sample["question"]).text
    assert _stock_answers(out, tiny_vqa.parent / sample["image"], sample["question"]) == want


def test_chat_template_runs_render_the_lms_template_and_drop_its_bos(towers, lms, tiny_vqa, tmp_path):
    from transformers import AutoTokenizer

    lm = tmp_path / "chat_lm"
    tokenizer = AutoTokenizer.from_pretrained(lms["llama"])
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    tokenizer.bos_token = "<eos>"
    tokenizer.add_bos_token = True  # as Llama's and Gemma's do; adaptkit's prompts carry no BOS
    assert tokenizer("yes")["input_ids"][0] == tokenizer.bos_token_id
    for f in lms["llama"].iterdir():
        (lm / f.name).parent.mkdir(exist_ok=True)
        (lm / f.name).write_bytes(f.read_bytes())
    tokenizer.save_pretrained(lm)
    run = _train(towers["siglip"], lm, tiny_vqa, tmp_path, ["data.chat_template=true"])
    report = export_llava(run, tmp_path / "llava", verify_samples=8)
    assert report["passed"] and report["prompts_identical"] and report["answers_identical"] == 1.0
    exported = AutoTokenizer.from_pretrained(tmp_path / "llava")
    assert exported("yes")["input_ids"] == exported("yes", add_special_tokens=False)["input_ids"]


def test_a_caption_run_exports_and_captions_with_the_trained_prompt(towers, lms, tiny_captions, tmp_path):
    """A projector caption run: the stock class, given the image alone in the user's turn, writes the run's
    captions (the processor's template supplies the recipe's caption prompt)."""
    from adaptkit.inference import load_for_inference

    caption = [f"data.train={tiny_captions}", f"data.eval={tiny_captions}", "task=caption"]
    caption += ["pack_questions=1", "data.prompt_template=A short caption:", "max_new_tokens=3"]
    run = _train(towers["clip"], lms["llama"], tiny_captions, tmp_path, caption)
    report = export_llava(run, tmp_path / "llava", verify_samples=6)
    assert report["passed"] and report["prompts_identical"] and report["answers_identical"] == 1.0
    assert sum(bool(a) for a in report["answers"]) >= 3  # captions, not stops
    image = tiny_captions.parent / "images" / "1.png"
    want = load_for_inference(run).predict(str(image)).text
    assert _stock_answers(tmp_path / "llava", image, None) == want


def test_runs_the_stock_class_cannot_express_are_refused_with_the_keys(tiny_run, tmp_path):
    from adaptkit.runs import check_run

    found = problems(check_run(tiny_run))
    text = "\n".join(found)
    assert (
        "adapter.kind=projector" in text and "adapter.inject_layer=0" in text and "vision.family=hf" in text
    )
    with pytest.raises(ExportError, match="cannot express this run") as err:
        export_llava(tiny_run, tmp_path / "out")
    assert "adapter.inject_layer=0" in str(err.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_standardisation_folds_into_the_first_layer_exactly():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 4)
    mean, std = torch.randn(6), torch.rand(6) + 0.1
    x = torch.randn(3, 6, dtype=torch.float64)
    weight, bias = fold_standardisation(layer.weight, layer.bias, mean, std)
    want = ((x - mean.double()) / std.double()) @ layer.weight.double().T + layer.bias.double()
    torch.testing.assert_close(x @ weight.double().T + bias.double(), want, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("template", ["{question}", "Question: {question} Answer:"])
def test_the_processors_template_renders_adaptkits_prompts(template):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from adaptkit.config import Recipe
    from adaptkit.data.collate import question_prompt

    recipe = Recipe()
    recipe.data.prompt_template = template
    jinja = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        chat_template(recipe, None)
    )
    q1, a1, q2 = "what  is the\tshape? ", "circle", "is it red?"
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q1}]},
        {"role": "assistant", "content": a1},
        {"role": "user", "content": q2},
    ]
    want = "<image>" + question_prompt(template, q2, [(q1, a1)])
    assert jinja.render(messages=messages, add_generation_prompt=True) == want


def test_a_folder_that_answers_otherwise_fails_its_check_and_is_kept_partial(
    towers, lms, tiny_vqa, tmp_path, monkeypatch
):
    import adaptkit.export_llava as export_llava_module

    run = _train(towers["clip"], lms["llama"], tiny_vqa, tmp_path)
    # Without the standardisation folded in, the stock model reads other image tokens than the run did.
    monkeypatch.setattr(export_llava_module, "fold_standardisation", lambda w, b, mean, std: (w, b))
    with pytest.raises(ExportError, match="does not reproduce the run"):
        export_llava(run, tmp_path / "llava", verify_samples=8)
    report = json.loads((tmp_path / "llava.partial" / "verification.json").read_text())
    assert not report["passed"] and report["max_abs_logit_diff"] > 1e-4
    assert report["prompts_identical"]  # the text side still matches; the image side does not
    assert not (tmp_path / "llava").exists()


def test_the_llava_recipe_is_expressible_and_the_shipped_default_is_not():
    assert problems(load_recipe("recipes/gpu_clip_llava.yaml")) == []
    found = problems(load_recipe("recipes/easyvqa_qformer_lora.yaml"))
    assert any("adapter.kind=qformer" in p for p in found) and any(
        "vision.family=torchvision" in p for p in found
    )


def test_a_bfloat16_folder_loads_in_bfloat16_and_answers_within_the_16bit_bounds(
    towers, lms, tiny_vqa, tmp_path
):
    from safetensors import safe_open

    from adaptkit.export import MIN_AGREEMENT_16BIT, TOLERANCE

    run = _train(towers["siglip"], lms["llama"], tiny_vqa, tmp_path)
    report = export_llava(run, tmp_path / "llava", dtype="bfloat16", verify_samples=12)
    assert report["passed"] and report["prompts_identical"] and "(bfloat16)" in report["loaded_with"]
    assert report["answers_identical"] >= MIN_AGREEMENT_16BIT and sum(bool(a) for a in report["answers"]) >= 4
    assert 0 < report["max_abs_logit_diff"] <= TOLERANCE["bfloat16"]
    with safe_open(str(next((tmp_path / "llava").glob("*.safetensors"))), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118 (a method)
