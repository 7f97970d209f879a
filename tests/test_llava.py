"""LLaVA conversation files as VQA data (one sample per assistant turn, earlier turns as context) and
prompts rendered with the LM's chat template."""

from __future__ import annotations

import json
import shutil

import pytest

from adaptkit.data.collate import answer_text, question_prompt
from adaptkit.data.formats import DataError, load_vqa
from adaptkit.data.llava import load_llava

CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def _entry(image="images/0.png", first="<image>\nwhat is the color of the shape?", more=True):
    convo = [{"from": "human", "value": first}, {"from": "gpt", "value": "red"}]
    if more:
        convo += [{"from": "human", "value": "what is the shape?"}, {"from": "gpt", "value": "circle"}]
    return {"id": "x", "image": image, "conversations": convo}


def test_every_assistant_turn_is_a_sample_with_its_context(tiny_vqa):
    path = tiny_vqa.parent / "llava.json"
    path.write_text(
        json.dumps([_entry(), _entry("images/1.png", "is there a red shape? <image>", more=False)])
    )
    samples = load_vqa(str(path)).samples
    assert [(s.question, s.answer) for s in samples] == [
        ("what is the color of the shape?", "red"),
        ("what is the shape?", "circle"),
        ("is there a red shape?", "red"),
    ]
    assert samples[0].context == () and samples[1].context == (("what is the color of the shape?", "red"),)
    assert samples[1].origin.endswith("llava.json[0] turn 2")
    plain = question_prompt("Question: {question} Answer:", samples[1].question, samples[1].context)
    assert (
        plain == "Question: what is the color of the shape? Answer: red Question: what is the shape? Answer:"
    )


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (_entry(first="what <image> is the color?"), "exactly one <image>, at the start or end"),
        (_entry(first="what is the color?"), "exactly one <image>"),
        ({"image": "images/0.png", "conversations": [{"from": "gpt", "value": "x"}] * 2}, "must alternate"),
        ({**_entry(), "image": None}, "has no 'image'"),
        (_entry(image="images/missing.png"), "not found"),
        (_entry(first="<image>"), "no text besides <image>"),
    ],
)
def test_bad_entries_are_named(tiny_vqa, entry, message):
    path = tiny_vqa.parent / "bad_llava.json"
    path.write_text(json.dumps([_entry(), entry]))
    with pytest.raises(DataError, match=rf"bad_llava.json\[1\]: .*{message}"):
        load_llava(path)
    data = load_llava(path, "skip")
    assert len(data.samples) == 2 and len(data.skipped) == 1


def test_chat_template_prompts(tiny_lm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    with pytest.raises(ValueError, match="has no chat template"):
        question_prompt("{question}", "what?", (), tok, chat=True)
    tok.chat_template = CHAT
    got = question_prompt("{question}", "what is the shape?", (("what color?", "red"),), tok, chat=True)
    turns = ["<|user|> what color? <eos>", "<|assistant|> red <eos>", "<|user|> what is the shape? <eos>"]
    assert got == " ".join(turns) + " <|assistant|> "
    assert answer_text(" circle ", chat=True) == "circle" and answer_text("circle") == " circle"


def test_a_run_on_llava_data_with_the_chat_template(tiny_overrides, tiny_lm_dir, tiny_vqa, tmp_path):
    from transformers import AutoTokenizer

    from adaptkit.inference import load_for_inference
    from adaptkit.recipes import load_recipe
    from adaptkit.train import train

    lm = tmp_path / "chat_lm"
    shutil.copytree(tiny_lm_dir, lm)
    tok = AutoTokenizer.from_pretrained(lm)
    tok.chat_template = CHAT
    tok.save_pretrained(lm)
    data = tiny_vqa.parent / "llava_train.json"
    data.write_text(json.dumps([_entry(f"images/{i}.png") for i in range(6)]))
    keep = [o for o in tiny_overrides if not o.startswith(("data.train=", "data.eval=", "language.name="))]
    recipe = load_recipe(
        "recipes/easyvqa_qformer_lora.yaml",
        [*keep, f"language.name={lm}", f"data.train={data}", f"data.eval={data}", "data.chat_template=true"],
    )
    summary = train(recipe)
    assert summary["train_samples"] == 12 and summary["eval"]["n"] == 8  # eval_limit=8 of the 12 turns
    import adaptkit.tasks.vqa as vqa

    predictor = load_for_inference(tmp_path / "run", "cpu")
    rendered = []

    def spy(*args, **kwargs):
        rendered.append(vqa_prompt(*args, **kwargs))
        return rendered[-1]

    vqa_prompt, vqa.question_prompt = vqa.question_prompt, spy
    try:
        answer = predictor.answer(str(tiny_vqa.parent / "images" / "0.png"), "what is the shape?")
    finally:
        vqa.question_prompt = vqa_prompt
    assert rendered == ["<|user|> what is the shape? <eos> <|assistant|> "] and isinstance(answer.text, str)
