"""The adaptkit Gradio demo: upload an image, ask a question, get the answer and the top answers.

    adaptkit demo RUN_OR_EXPORT_DIR [--host 127.0.0.1] [--port 7860]
    python app/demo.py RUN_OR_EXPORT_DIR [--host ...] [--port ...]

One process: the model lives in this process and a queue (at most ``QUEUE_SIZE`` waiting requests, one
running at a time) feeds it. Hardened for showing on a network: no public share link unless asked,
bound to 127.0.0.1 unless another host is given, uploads capped at ``MAX_FILE_SIZE`` and kept in a folder
of the demo's own (old ones deleted while it runs, the folder when it exits), and a file that is not a
decodable image (or is over the pixel limit training applies: a decompression bomb) gets a readable message
instead of a traceback, before its pixels are decoded.
The API endpoint is ``/answer`` (``gradio_client.Client(url).predict(handle_file(img), question,
api_name="/answer")`` returns ``(answer_text, top_answers)``).
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import warnings
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage pings from a demo of your model

import gradio as gr  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

MAX_FILE_SIZE = "10mb"
QUEUE_SIZE = 16
UPLOAD_MAX_AGE_S = 600  # uploads older than this are deleted while the demo runs
EMPTY_ANSWER = "(no answer: the model ended its reply at once)"
NOT_AN_IMAGE = "This file is not an image I can read ({why}). Upload a PNG, JPEG, WebP, GIF or BMP image."

log = logging.getLogger("adaptkit.demo")


class _BadUpload(str):
    """The reason an upload could not be decoded, passed to the handler instead of an image."""


def tolerant_image(**kwargs) -> gr.Image:
    """``gr.Image`` whose undecodable uploads reach the handler as a :class:`_BadUpload` reason instead
    of failing inside Gradio with a bare "Error" (a subclass would make Gradio write a .pyi stub file)."""
    component = gr.Image(**kwargs)
    strict = component.preprocess

    def preprocess(payload):
        try:
            with warnings.catch_warnings():  # the pixel limit training applies: a bomb is refused at open
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                return strict(payload)
        except (
            UnidentifiedImageError,
            OSError,
            ValueError,
            Image.DecompressionBombError,
            Image.DecompressionBombWarning,
        ) as err:
            name = getattr(payload, "orig_name", None) or "the upload"
            return _BadUpload(f"{name}: {type(err).__name__}: {err}".strip())

    component.preprocess = preprocess
    return component


def _facts_markdown(facts: dict) -> str:
    def fmt(n):
        return f"{n:,}" if isinstance(n, int) else "unknown"

    metric, value = facts.get("eval_metric", "accuracy"), facts.get("eval_value", facts.get("eval_accuracy"))
    shown = f"{value:.2%}" if metric == "accuracy" and isinstance(value, float) else f"{value:.4f}"
    acc_text = (
        f"{shown} on {facts.get('eval_samples')} samples of {facts.get('eval_data') or 'its eval data'}"
        if isinstance(value, float)
        else "not evaluated"
    )
    trainable, total = facts.get("trainable_parameters"), facts.get("total_parameters")
    share = f" ({trainable / total:.1%})" if isinstance(trainable, int) and total else ""
    rows = [
        ("loaded from", f"`{facts.get('source')}` ({facts.get('kind')})"),
        ("vision backbone", facts.get("vision")),
        ("fusion adapter", facts.get("adapter")),
        ("language model", f"{facts.get('language')} (frozen), LoRA: {facts.get('lora')}"),
        *([("text encoder", facts["text_encoder"])] if facts.get("text_encoder") else []),
        ("trainable / total parameters", f"{fmt(trainable)} / {fmt(total)}{share}"),
        (f"eval {metric}", acc_text),
        ("prompt", f"`{facts.get('prompt_template')}`"),
    ]
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def private_upload_folder() -> Path:
    """A fresh folder for this demo's uploads and Gradio's cache (``GRADIO_TEMP_DIR``), removed when the
    demo exits; uploads older than ``UPLOAD_MAX_AGE_S`` are deleted while it runs."""
    folder = Path(tempfile.mkdtemp(prefix="adaptkit-demo-uploads-"))
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    log.info("uploads kept in %s (removed when the demo exits)", folder)
    return folder


def example_rows(predictor, count: int = 4) -> list[list[str]]:
    """A few examples of the model's eval data (``Task.examples``), images copied to a temp folder
    Gradio may serve."""
    examples = predictor.task.examples(count)
    if not examples:
        return []
    folder = Path(tempfile.mkdtemp(prefix="adaptkit-demo-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # served while the demo runs, then removed
    log.info("example images copied to %s (removed when the demo exits)", folder)
    rows = []
    for image, text in examples:
        target = folder / f"example{len(rows)}{Path(image).suffix}"
        shutil.copy2(image, target)
        rows.append([str(target), text])
    return rows


def respond(predictor, image, text: str | None) -> tuple[str, dict | None]:
    """The demo's reply to one request: the output text and the ranked outputs (``{label: p}``), or a
    message saying what to do. An empty text is a request only where the task allows it (retrieval ranks the
    run's classes, captioning uses the recipe's prompt)."""
    from adaptkit.data.formats import DataError

    spec = predictor.task.demo
    if isinstance(image, _BadUpload):
        return NOT_AN_IMAGE.format(why=str(image)), None
    if image is None:
        return "Upload an image first.", None
    text = (text or "").strip()
    if not text and spec.text_required:
        return f"Type a {spec.text_label.lower()} about the image.", None
    try:
        result = predictor.predict(image, text or None)
    except (DataError, ValueError) as err:
        return f"Cannot answer: {err}", None
    top = dict(result.top) if result.top else {result.text: result.score}
    return result.text or EMPTY_ANSWER, top


def build_demo(predictor, examples: list[list[str]] | None = None) -> gr.Blocks:
    """The demo's Blocks for a predictor (``adaptkit.predictor.Predictor``); its task's ``demo`` labels
    the text box and the outputs."""
    spec = predictor.task.demo

    def answer(image, question: str):
        return respond(predictor, image, question)

    with gr.Blocks(title="adaptkit demo", delete_cache=(UPLOAD_MAX_AGE_S, UPLOAD_MAX_AGE_S)) as demo:
        gr.Markdown(f"# adaptkit demo\n{spec.intro}")
        with gr.Row():
            with gr.Column():
                image = tolerant_image(type="pil", label="Image", sources=["upload", "clipboard"], height=300)
                question = gr.Textbox(
                    label=spec.text_label, placeholder=spec.text_placeholder, lines=spec.text_lines
                )
                ask = gr.Button("Ask", variant="primary")
            with gr.Column():
                text = gr.Textbox(label=spec.output_label, interactive=False, elem_id="answer")
                top = gr.Label(label=spec.ranked_label, num_top_classes=5)
        if examples:
            gr.Examples(examples=examples, inputs=[image, question], label="examples from the eval data")
        with gr.Accordion("About this model", open=True):
            gr.Markdown(_facts_markdown(predictor.facts()))
        ask.click(answer, inputs=[image, question], outputs=[text, top], api_name="answer")
        question.submit(answer, inputs=[image, question], outputs=[text, top], api_name=False)
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    return demo


def launch(predictor, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True):
    """Serve the demo; returns ``(demo, url)`` (with ``block=False`` the server runs in a thread)."""
    if block and threading.current_thread() is threading.main_thread():
        # SIGTERM (a service manager, `kill`) exits like Ctrl-C, so exit handlers (temp files) run.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    private_upload_folder()
    demo = build_demo(predictor, example_rows(predictor))
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the demo is bound to %s: anyone who reaches this address can use it", host)
    _, url, _ = demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=MAX_FILE_SIZE,
        show_error=False,
        prevent_thread_lock=not block,
        quiet=False,
    )
    return demo, url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="a run directory or an export folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    from adaptkit.inference import load_for_inference

    launch(load_for_inference(args.dir, device=args.device), args.host, args.port, args.share)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
