"""``adaptkit export RUN --format hf-remote-code`` for a retrieval run: a transformers folder with CLIP's
interface that loads without adaptkit::

    model = AutoModel.from_pretrained(DIR, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(DIR, trust_remote_code=True)
    model(**processor(images=images, text=texts)).logits_per_image

It holds the tower, the adapter and the embedding head, and the text encoder with its LoRA merged
(``model.safetensors``), ``retrieval_adaptkit.py`` (which imports the tower and adapter from
``modeling_adaptkit.py``, also copied) and ``processing_adaptkit.py``. The matching head (ITM) is not
exported: ranking uses the embeddings, as ``adaptkit predict`` does. The check, in a fresh process where
adaptkit cannot be imported, requires the processor's text ids to be the run's, the best text of every held
image the run's, and the temperature-scaled similarities within the export's tolerance of the run's.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

AUTO_MAP = {
    "AutoConfig": "retrieval_adaptkit.AdaptkitRetrievalConfig",
    "AutoModel": "retrieval_adaptkit.AdaptkitForRetrieval",
}
FILES = ("modeling_adaptkit.py", "retrieval_adaptkit.py", "processing_adaptkit.py")


def build(recipe, trained, tower) -> tuple[object, object]:
    """The retrieval model (float32, every part loaded strictly) and its processor; merges the text
    encoder's LoRA into ``trained``'s encoder. ``tower``: the vision tower's (config spec, processor spec)."""
    import dataclasses

    modeling = importlib.import_module("adaptkit.remote.retrieval_adaptkit")
    processing = importlib.import_module("adaptkit.remote.processing_adaptkit")
    spec, reads = tower
    head = trained.objectives.heads["embed"]
    text_model = trained.text_encoder.merged()
    config = modeling.AdaptkitRetrievalConfig(
        text_config=text_model.config.to_dict(),
        vision=spec,
        adapter={**dataclasses.asdict(recipe.adapter), "fusion": trained.adapter.fusion},
        image_dim=head.image_proj.in_features,
        embed_dim=head.image_proj.out_features,
        auto_map=AUTO_MAP,
        architectures=["AdaptkitForRetrieval"],
    )
    model = modeling.AdaptkitForRetrieval(config).eval()
    model.vision.load_state_dict(trained.vision.state_dict(), strict=True)
    model.adapter.load_state_dict(trained.adapter.state_dict(), strict=True)
    model.text_model.load_state_dict(text_model.state_dict(), strict=True)
    model.embed.load_state_dict(head.state_dict(), strict=True)
    processor = processing.AdaptkitProcessor(
        trained.text_encoder.tokenizer, tower=reads, text_max_length=recipe.text_encoder.max_length
    )
    processor.auto_map = {"AutoProcessor": "processing_adaptkit.AdaptkitProcessor"}
    return model, processor


def write(recipe, run: Path, partial: Path, dtype: str, verify_samples: int, tower):
    """The folder in ``partial`` and what the check compares it with (``export_llava_verify.Written``): one
    row per held image, every held caption its candidates. ``tower(recipe, vision)``: the tower's specs
    (``export_remote._tower``)."""
    from adaptkit.export import DTYPES, _held_samples
    from adaptkit.export_llava_verify import Written
    from adaptkit.runs import load_run
    from adaptkit.tasks import get_task
    from adaptkit.tasks.retrieval import held_scores

    _, trained = load_run(run, "cpu", verify=False)  # the frame's check_run has verified its files
    spec, samples = _held_samples(get_task(recipe), recipe, verify_samples)
    paths, texts, logits = held_scores(trained, samples)  # the run's own scores
    ids, _ = trained.text_encoder.tokenize(texts)
    model, processor = build(recipe, trained, tower(recipe, trained.vision))
    model.to(DTYPES[dtype]).save_pretrained(partial, safe_serialization=True)
    processor.save_pretrained(partial)
    for name in FILES:
        shutil.copy2(Path(__file__).with_name("remote") / name, partial / name)
    rows = [
        {"image": p, "texts": texts, "text_ids": ids.tolist(), "expected_answer": int(row.argmax())}
        for p, row in zip(paths, logits)
    ]
    return Written(spec, rows, [row[None] for row in logits], {}, lambda report: _card(recipe, report))


def _card(recipe, report: dict) -> str:
    return "\n".join(
        [
            f"# adaptkit export of `{report['source_run']}` (transformers, remote code, retrieval)",
            "",
            f"- vision tower: {recipe.vision.family} `{recipe.vision.name}`, frozen; adapter: "
            f"{recipe.adapter.kind}; text encoder: `{recipe.text_encoder.name}` (LoRA merged, if any); "
            f"every weight saved as {report['dtype']}",
            "",
            "```python",
            "from transformers import AutoModel, AutoProcessor",
            "model = AutoModel.from_pretrained('THIS_FOLDER', trust_remote_code=True)",
            "processor = AutoProcessor.from_pretrained('THIS_FOLDER', trust_remote_code=True)",
            "inputs = processor(images=[image], text=['a red circle', 'a blue square'])",
            "print(model(**inputs).logits_per_image.softmax(-1))",
            "```",
            "",
            f"Verified in a process without adaptkit on {report['samples']} held images of {report['data']} "
            f"against their captions: best text identical for {report['answers_identical']:.1%}, largest "
            f"|scaled similarity difference| {report['max_abs_logit_diff']:.2e} (tolerance "
            f"{report['tolerance']}).",
            "",
        ]
    )
