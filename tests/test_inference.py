"""The inference API: load_for_inference on a run directory, answers, scores, top answers, bad inputs."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from adaptkit.cli import main
from adaptkit.data.formats import DataError
from adaptkit.data.splits import prepare_split
from adaptkit.inference import load_for_inference
from adaptkit.tasks.vqa import Answer, VQAPredictor, answer_set


def _samples(vqa):
    rows = [json.loads(line) for line in vqa.read_text().splitlines()]
    return [str(vqa.parent / r["image"]) for r in rows], [r["question"] for r in rows]


def test_predictor_matches_evaluation_and_ranks_answers(tiny_run, tiny_vqa):
    predictor = load_for_inference(tiny_run, "cpu")
    images, questions = _samples(tiny_vqa)
    got = predictor.answer_batch(images, questions, batch_size=5)  # batches that do not divide 24
    assert isinstance(predictor, VQAPredictor) and predictor.task.name == "vqa"
    task = predictor.task
    dataset, feats, _ = prepare_split(task, predictor.model, str(tiny_vqa), "cpu", progress=False)
    _, records = task.evaluate(predictor.model, dataset, feats, batch_size=8, progress=False)
    assert [a.text for a in got] == [r["prediction"] for r in records]
    assert [a.score for a in got] == pytest.approx([r["score"] for r in records], abs=1e-4)

    answers = [json.loads(x)["answer"] for x in tiny_vqa.read_text().splitlines()]
    assert predictor.answers == answer_set(answers)
    for answer in got:
        probs = [p for _, p in answer.top]
        assert len(answer.top) == 5 and probs == sorted(probs, reverse=True)
        assert 0 < sum(probs) <= 1 + 1e-5 and all(a in predictor.answers for a, _ in answer.top)
        assert 0 <= answer.score <= 1

    # One at a time, and from every supported kind of image input, gives the same answer.
    first = Image.open(images[0])
    buffer = io.BytesIO()
    first.save(buffer, format="PNG")
    for given in (images[0], first, np.asarray(first), buffer.getvalue()):
        single = predictor.answer(given, questions[0])
        assert isinstance(single, Answer) and single.text == got[0].text
        assert predictor.predict(given, questions[0]).to_dict() == single.to_dict()  # what CLI and demo call
        assert [a for a, _ in single.top] == [a for a, _ in got[0].top]
        assert [p for _, p in single.top] == pytest.approx([p for _, p in got[0].top], abs=1e-4)


def test_question_whitespace_does_not_change_the_prompt(tiny_run, tiny_vqa):
    """A question typed with stray spaces, tabs or a newline asks what the training text asked (SmolLM2's
    byte-level tokenizer would give it other tokens; the tiny word-level one drops whitespace itself, so the
    texts handed to the tokenizer are checked)."""
    from adaptkit.data.collate import VQADataset, format_prompt
    from adaptkit.data.formats import VQASample

    assert format_prompt("Q: {question} A:", "  what  is\tthe shape? \n") == "Q: what is the shape? A:"
    predictor = load_for_inference(tiny_run, "cpu")
    images, questions = _samples(tiny_vqa)
    messy = [" " + q.replace(" ", "  \t", 1) + " \n" for q in questions[:3]]
    tokenizer, seen = predictor.model.tokenizer, []

    class Spy:  # the tokenizer, recording the texts of each call
        def __call__(self, texts, *args, **kwargs):
            seen.append(list(texts))
            return tokenizer(texts, *args, **kwargs)

        def __getattr__(self, name):
            return getattr(tokenizer, name)

    spy = predictor.model.tokenizer = Spy()
    try:
        predictor._prompts(messy)
        samples = [VQASample(image="x.png", question=q, answer="a", origin="test") for q in messy]
        VQADataset(samples, {"x.png": 0}, spy, predictor.template)
    finally:
        predictor.model.tokenizer = tokenizer
    expected = [format_prompt(predictor.template, q) for q in questions[:3]]
    assert seen[0] == expected and seen[1] == expected  # the prompts of inference and of training
    clean, got = predictor.answer_batch(images[:3], questions[:3]), predictor.answer_batch(images[:3], messy)
    assert [a.text for a in got] == [a.text for a in clean]


def test_top_answers_are_the_models_own_ranking(tiny_run, tiny_vqa):
    """The top answer set's probabilities are the model's sequence likelihoods, normalised over the set."""
    predictor = load_for_inference(tiny_run, "cpu")
    images, questions = _samples(tiny_vqa)
    feats = predictor.encode(images[:2])
    prompts = predictor._prompts(questions[:2])
    logp = predictor.candidate_logprobs(feats, prompts, predictor.answers)
    assert logp.shape == (2, len(predictor.answers)) and (logp < 0).all()
    answer = predictor.answer(images[0], questions[0], top_k=len(predictor.answers))
    expected = dict(zip(predictor.answers, logp[0].softmax(-1).tolist()))
    for text, prob in answer.top:
        assert prob == pytest.approx(expected[text], abs=1e-5)


def test_bad_inputs_get_clear_errors(tiny_run, tmp_path):
    predictor = load_for_inference(tiny_run, "cpu")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.txt is not an image"):
        predictor.answer(text, "what shape?")
    with pytest.raises(DataError, match="does not exist"):
        predictor.answer(tmp_path / "missing.png", "what shape?")
    with pytest.raises(DataError, match="bytes are not an image"):
        predictor.answer(b"\x00\x01garbage", "what shape?")
    img = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="question 0 is empty"):
        predictor.answer(img, "  ")
    with pytest.raises(ValueError, match="2 images but 1 questions"):
        predictor.answer_batch([img, img], ["what?"])


def test_predict_cli(tiny_run, tiny_vqa, capsys):
    images, questions = _samples(tiny_vqa)
    assert main(["predict", str(tiny_run), "--image", images[0], "--question", questions[0], "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = load_for_inference(tiny_run, "cpu").answer(images[0], questions[0], top_k=3)
    assert result["answer"] == expected.text and len(result["top"]) == 3
    assert main(["predict", str(tiny_run), "--image", images[0], "--question", questions[0]]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(expected.text) and "%" in printed
    assert main(["predict", str(tiny_run), "--image", images[0], "--text", questions[0], "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert main(["predict", str(tiny_run), "--image", "nope.png", "--question", "x"]) == 2
    assert "nope.png does not exist" in capsys.readouterr().err
    assert main(["predict", str(tiny_run), "--image", images[0]]) == 2  # VQA needs its question
    assert "question 0 is empty" in capsys.readouterr().err


def test_every_input_kind_is_decoded_like_training_images(tiny_run, tiny_vqa, tmp_path):
    """A transparent RGBA image gives the same features as a path, bytes, PIL image or array (white
    background, as training's decoder makes it), not a black one."""
    import torch

    base = Image.open(tiny_vqa.parent / "images" / "0.png").convert("RGB")
    rgba = Image.new("RGBA", base.size, (0, 0, 0, 0))
    rgba.paste(base, mask=Image.eval(base.convert("L"), lambda v: 255 if v < 200 else 0))
    path = tmp_path / "rgba.png"
    rgba.save(path)
    predictor = load_for_inference(tiny_run, "cpu")
    reference = predictor.encode([str(path)])
    for given in (Image.open(path), np.asarray(Image.open(path)), path.read_bytes()):
        assert torch.equal(predictor.encode([given]), reference)
    assert not torch.equal(predictor.encode([rgba.convert("RGB")]), reference)  # black background differs


def test_features_are_rounded_as_the_run_stored_them(tiny_run, tmp_path):
    import shutil

    import torch

    from adaptkit.runs import check_run

    predictor = load_for_inference(tiny_run, "cpu")
    # float32 by default, which is also what runs saved before the key existed used.
    assert predictor.model.feature_dtype == torch.float32
    assert "\nfeature_dtype: float32\n" in (tiny_run / "recipe.yaml").read_text()
    image = Image.new("RGB", (64, 64), (200, 40, 90))
    exact = predictor.model.encode_images([image])
    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    text = (old / "recipe.yaml").read_text()
    (old / "recipe.yaml").write_text(text.replace("\nfeature_dtype: float32\n", "\n"))
    assert check_run(old, verify=False).feature_dtype == "float32"
    # A run whose features were stored as float16 rounds fresh ones (predict, export, the demo) the same way.
    (old / "recipe.yaml").write_text(text.replace("\nfeature_dtype: float32\n", "\nfeature_dtype: float16\n"))
    half = load_for_inference(old, "cpu", verify=False)
    assert half.model.feature_dtype == torch.float16
    rounded = half.model.encode_images([image])
    assert torch.equal(rounded, exact.half().float()) and not torch.equal(rounded, exact)
