"""A new adapter or task is a local addition: registered in its dict, it trains, saves, loads and predicts
through the unchanged loop, evaluation and inference (docs/extending.md walks through the same steps)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from adaptkit.adapters import ADAPTERS
from adaptkit.adapters.base import FusionAdapter
from adaptkit.inference import load_for_inference
from adaptkit.recipes import load_recipe
from adaptkit.runs import load_run
from adaptkit.tasks import TASKS
from adaptkit.tasks.vqa import VQATask
from adaptkit.train import train

RECIPE = "recipes/easyvqa_qformer_lora.yaml"


class PooledProjector(FusionAdapter):
    """A minimal soft-token adapter: the mean image token, projected to ``num_queries`` LM tokens."""

    def __init__(self, cfg, vision_dim, lm_dim, output_std=None, vision_tokens=None):
        super().__init__(cfg, vision_dim, lm_dim, output_std, vision_tokens)
        self.num_tokens = cfg.options["num_queries"]
        self.proj = nn.Linear(vision_dim, lm_dim * self.num_tokens)
        self.lm_dim = lm_dim

    def forward(self, image_features, text_embeds=None, text_mask=None):
        pooled = self.standardize(image_features).mean(dim=1)
        return self.proj(pooled).view(pooled.shape[0], self.num_tokens, self.lm_dim)


def test_a_registered_adapter_trains_saves_and_loads(tiny_overrides, tiny_vqa, tmp_path, monkeypatch):
    monkeypatch.setitem(ADAPTERS, "pooled", PooledProjector)
    recipe = load_recipe(RECIPE, [*tiny_overrides, "adapter.kind=pooled", "adapter.options.num_queries=2"])
    summary = train(recipe)
    run = tmp_path / "run"
    assert summary["parameters"]["adapter"] == 1280 * 64 * 2 + 64 * 2
    _, model = load_run(run)
    assert isinstance(model.adapter, PooledProjector) and model.adapter.feature_std.ne(1).any()
    feats = torch.randn(3, 4, 1280)
    first = model.adapter(feats)
    _, again = load_run(run)
    torch.testing.assert_close(again.adapter(feats), first, rtol=0, atol=0)  # saved -> loaded exactly
    predictor = load_for_inference(run, "cpu")
    image = str(tiny_vqa.parent / "images" / "0.png")
    assert isinstance(predictor.predict(image, "what is the shape?").text, str)


class SpyTask(VQATask):
    """VQA, recording which of its methods the loop, evaluation and inference call."""

    name = "spy"
    calls: list[str] = []

    def _note(self, name):
        SpyTask.calls.append(name)

    def load(self, spec, on_bad_sample="error"):
        self._note("load")
        return super().load(spec, on_bad_sample)

    def dataset(self, samples, image_rows, tokenizer):
        self._note("dataset")
        return super().dataset(samples, image_rows, tokenizer)

    def collate(self, pad_id, pack=1):
        self._note("collate")
        return super().collate(pad_id, pack)

    def setup_objectives(self, model, dataset):
        self._note("setup_objectives")
        return super().setup_objectives(model, dataset)

    def loss(self, model, features, batch):
        self._note("loss")
        return super().loss(model, features, batch)

    def evaluate(self, *args, **kwargs):
        self._note("evaluate")
        return super().evaluate(*args, **kwargs)

    def save_run_files(self, run_dir, dataset):
        self._note("save_run_files")
        (run_dir / "spy.txt").write_text("written by the task")
        return super().save_run_files(run_dir, dataset)

    def predictor(self, *args, **kwargs):
        self._note("predictor")
        return super().predictor(*args, **kwargs)


def test_the_loop_and_inference_ask_the_task(tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.setitem(TASKS, "spy", SpyTask)
    SpyTask.calls = []
    train(load_recipe(RECIPE, [*tiny_overrides, "task=spy", "eval_every=2"]))
    calls = SpyTask.calls
    assert calls.count("load") == 2 and calls.count("dataset") == 2  # train and eval splits
    assert calls.count("loss") == 4 and calls.count("evaluate") == 2  # every step; step 2 and the end
    assert {"collate", "setup_objectives", "save_run_files"} <= set(calls)
    assert (tmp_path / "run" / "spy.txt").is_file()
    predictor = load_for_inference(tmp_path / "run", "cpu")
    assert isinstance(predictor.task, SpyTask) and calls[-1] == "predictor"


def test_demo_examples_of_every_built_in_task(tmp_path, caplog):
    from adaptkit.data.formats import DataError
    from adaptkit.tasks.base import eval_examples

    for name in ("a", "b"):
        (tmp_path / f"{name}.png").write_bytes(b"png")
    Sample = type("Sample", (), {})
    samples = []
    for image, question in [("a", "q1"), ("a", "q2"), ("gone", "q3"), ("b", "q4")]:
        sample = Sample()
        sample.image, sample.question = str(tmp_path / f"{image}.png"), question
        samples.append(sample)
    # One row per distinct image that exists, in order, up to the count.
    rows = eval_examples(lambda: samples, 5, lambda s: s.question)
    assert rows == [(str(tmp_path / "a.png"), "q1"), (str(tmp_path / "b.png"), "q4")]
    assert eval_examples(lambda: samples, 1) == [(str(tmp_path / "a.png"), "")]

    def unreadable():
        raise DataError("data.jsonl line 3: bad")

    assert eval_examples(unreadable, 4) == [] and "data.jsonl line 3" in caplog.text

    # The built-in tasks give images that exist, with the question for VQA and an empty text otherwise.
    recipes = {
        "vqa": RECIPE,
        "retrieval": "recipes/easyvqa_retrieval.yaml",
        "caption": "recipes/easyvqa_caption_lora.yaml",
    }
    for task_name, recipe_path in recipes.items():
        recipe = load_recipe(recipe_path)
        assert recipe.task == task_name
        task = TASKS[task_name](recipe)
        rows = task.examples(3)
        assert len(rows) == 3 and len({image for image, _ in rows}) == 3, task_name
        assert all(Path(image).is_file() for image, _ in rows)
        assert all(bool(text) == (task_name == "vqa") for _, text in rows), task_name
