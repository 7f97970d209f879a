"""The lmms-eval plug-in (``adaptkit.lmms_eval_plugin``), driven with requests shaped as lmms-eval's
(``Instance.args``: context, generation settings or target, ``doc_to_visual``, doc id, task, split) over a
task whose documents hold the tiny VQA set: its answers are ``adaptkit eval``'s, ``until`` cuts them,
``loglikelihood`` scores the greedy answer as greedy. lmms-eval itself is not a dependency; where it is
installed, its registry finds the model through adaptkit's entry point."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
from dataclasses import dataclass

import pytest
from PIL import Image

from adaptkit.lmms_eval_plugin import AdaptkitRequests


@dataclass
class Request:
    args: tuple


def _docs(vqa) -> list[dict]:
    rows = [json.loads(line) for line in vqa.read_text().splitlines()]
    return [
        {"image": str(vqa.parent / r["image"]), "question": r["question"], "answer": r["answer"]}
        for r in rows
    ]


def _requests(docs, second) -> list[Request]:
    def visual(doc):
        return [Image.open(doc["image"]).convert("RGB")]

    return [Request((d["question"], second, visual, i, "toy", "test")) for i, d in enumerate(docs)]


@pytest.fixture(scope="module")
def tiny_answering_run(tiny_lm_dir, tiny_mobilenet_pth, tiny_vqa, tmp_path_factory):
    """A tiny run whose greedy answers are not all empty (the shared tiny run's are): gated cross-attention
    at layers 0 and 1, trained briefly at a high rate."""
    from adaptkit.recipes import load_recipe
    from adaptkit.train import train
    from tests.conftest import overrides_for
    from tests.test_export_remote import FAST, RECIPE

    root = tmp_path_factory.mktemp("lmms_run")
    xattn = ["adapter.kind=xattn", "adapter.inject_layer=0", "adapter.xattn.layers=[0,1]"]
    train(load_recipe(RECIPE, overrides_for(tiny_lm_dir, tiny_mobilenet_pth, tiny_vqa, root) + FAST + xattn))
    return root / "run"


@pytest.fixture(scope="module")
def plugin(tiny_answering_run, tiny_vqa):
    model = AdaptkitRequests(str(tiny_answering_run), batch_size=3)
    model.task_dict = {"toy": {"test": _docs(tiny_vqa)}}
    return model


def test_generate_until_gives_adaptkit_evals_answers(plugin, tiny_answering_run, tiny_vqa, tmp_path):
    from adaptkit.cli import main

    run = shutil.copytree(tiny_answering_run, tmp_path / "run")  # eval writes into the run
    assert main(["eval", str(run), "--data", str(tiny_vqa)]) == 0
    ours = [json.loads(line)["prediction"] for line in (run / "eval_predictions.jsonl").open()]
    assert any("e" in a for a in ours)  # answers the cut below changes
    docs = plugin.task_dict["toy"]["test"]
    answers = plugin.generate_until(_requests(docs, {"until": ["\n\n"], "max_new_tokens": 3}))
    assert answers == ours and len(answers) == len(docs)
    cut = plugin.generate_until(_requests(docs, {"until": ["e"]}))
    assert cut == [a.split("e")[0].strip() for a in ours]


def test_loglikelihood_scores_the_greedy_answer_as_greedy(plugin):
    docs = plugin.task_dict["toy"]["test"][:2]
    greedy = plugin.generate_until(_requests(docs, {}))
    scored = plugin.loglikelihood(
        [
            Request((d["question"], g or "yes", r.args[2], i, "toy", "test"))
            for i, (d, g, r) in enumerate(zip(docs, greedy, _requests(docs, {})))
        ]
    )
    for (logp, is_greedy), g in zip(scored, greedy):
        assert logp <= 0.0 and is_greedy == bool(g)


def test_registered_for_lmms_eval():
    """The entry point lmms-eval reads; with lmms-eval installed, its registry resolves the class."""
    found = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="lmms_eval.models")}
    assert found.get("adaptkit") == "adaptkit.lmms_eval_plugin:manifest"
    if importlib.util.find_spec("lmms_eval") is None:
        pytest.skip("lmms-eval is not installed (adaptkit does not depend on it)")
    from lmms_eval.models import get_model

    model_class = get_model("adaptkit")
    assert model_class.__name__ == "AdaptkitLMMS"
    assert not model_class.__abstractmethods__  # lmms-eval can instantiate it


def test_caption_run_captions_as_the_predictor(
    tiny_lm_dir, tiny_mobilenet_pth, tiny_text_encoder_dir, tiny_captions, tmp_path, monkeypatch
):
    """A caption run in lmms-eval's captioning tasks: ``generate_until`` gives the predictor's greedy
    captions, after the recipe's prompt (``prompt=run``) or each request's context (``prompt=task``), cut at
    ``until``; it has no ``loglikelihood``, and an unknown ``prompt`` is refused by name."""
    from adaptkit.inference import load_for_inference
    from adaptkit.recipes import load_recipe
    from adaptkit.train import train
    from tests.conftest import retrieval_overrides
    from tests.test_export_remote import CAPTION, FAST

    base = retrieval_overrides(
        tiny_lm_dir, tiny_mobilenet_pth, tiny_text_encoder_dir, tiny_captions, tmp_path
    )
    base = [o for o in base if not o.startswith(("text_encoder.", "objectives."))]
    train(load_recipe(CAPTION, base + FAST + ["lr_adapter=0.05", "max_new_tokens=6"]))
    run = str(tmp_path / "run")
    rows = [json.loads(line) for line in tiny_captions.read_text().splitlines()]
    docs = [{"image": str(tiny_captions.parent / r["image"])} for r in rows]
    contexts = ["Provide a one-sentence caption for the provided image.", "  Describe\nit:"]

    def requests(second) -> list[Request]:
        def visual(doc):
            return [Image.open(doc["image"]).convert("RGB")]

        return [Request((contexts[i % 2], second, visual, i, "cap", "test")) for i in range(len(docs))]

    predictor = load_for_inference(run, "cpu")
    trained = [predictor.caption(d["image"]).text for d in docs]
    asked = [predictor.caption(d["image"], contexts[i % 2]).text for i, d in enumerate(docs)]
    assert any(trained)  # captions, not stops
    # Which prompt each mode captions after, seen where the predictor takes it: a tiny run may caption alike
    # after both prompts, so equal texts alone could not tell a plug-in that ignores prompt=task.
    prompts: list = []
    caption_batch = type(predictor).caption_batch

    def spy(self, images, prompt=None):
        prompts.extend([prompt] * len(images))
        return caption_batch(self, images, prompt)

    monkeypatch.setattr(type(predictor), "caption_batch", spy)
    for prompt, want, after in (
        ("run", trained, [None] * 6),
        ("task", asked, [contexts[i % 2] for i in range(6)]),
    ):
        plugin = AdaptkitRequests(run, batch_size=4, prompt=prompt)
        plugin.task_dict = {"cap": {"test": docs}}
        prompts.clear()
        assert plugin.generate_until(requests({"max_new_tokens": 6})) == want
        assert sorted(prompts, key=str) == sorted(after, key=str)
    cut = plugin.generate_until(requests({"until": [" "]}))
    assert cut == [c.split(" ")[0].strip() for c in want]
    with pytest.raises(NotImplementedError, match="generate_until"):
        plugin.loglikelihood(requests("a caption"))
    with pytest.raises(ValueError, match="prompt='question'"):
        AdaptkitRequests(run, prompt="question")
