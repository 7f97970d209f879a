"""Shared fixtures: tiny random backbones built from configs and saved to tmp dirs, and a tiny VQA set.

The real loading code (``from_pretrained``, state-dict files, JSONL parsing) runs on these, only the
weights are random and small.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60)}
SHAPES = ("circle", "rectangle")
WORDS = (
    "question : what is the color of shape ? answer is there a in image yes no "
    + " ".join(COLORS)
    + " "
    + " ".join(SHAPES)
).split()


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<eos>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(WORDS)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )


def save_tiny_lm(out: Path, model_class, config_class, **sizes) -> Path:
    """A random causal LM of ``config_class(**sizes)`` with the word-level tokenizer, saved to ``out``."""
    tokenizer = _tiny_tokenizer()
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        **sizes,
    )
    torch.manual_seed(0)
    model_class(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def save_tiny_gemma3(out: Path, layer_types: list[str], window: int = 4) -> Path:
    """A random Gemma-3 text LM (``layer_types`` sliding / full, ``window``-token sliding window, tied
    and scaled embeddings) with the word-level tokenizer, saved to ``out``."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return save_tiny_lm(
        out,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        num_hidden_layers=len(layer_types),
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=window,
        layer_types=layer_types,
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama with a word-level tokenizer, saved as a Hugging Face folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_lm")
    return save_tiny_lm(out, LlamaForCausalLM, LlamaConfig, num_hidden_layers=2, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_mobilenet_pth(tmp_path_factory) -> Path:
    """A random-weight torchvision MobileNetV2 state dict saved as .pth (loaded with weights_only)."""
    import torchvision

    out = tmp_path_factory.mktemp("tiny_vision") / "mobilenet_v2_random.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), out)
    return out


def bomb_png(path: Path, side: int = 12_000) -> None:
    """A valid PNG header declaring ``side`` x ``side`` grayscale pixels (144 MP by default, over PIL's
    decompression-bomb limit) with almost no data: a few hundred bytes that would decode to gigabytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def draw_sample(path: Path, color: str, shape: str) -> None:
    img = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(img)
    box = (14, 14, 50, 50)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
    img.save(path)


@pytest.fixture(scope="session")
def tiny_vqa(tmp_path_factory) -> Path:
    """A VQA JSONL file (6 images, 24 questions) with images relative to it."""
    root = tmp_path_factory.mktemp("tiny_vqa")
    (root / "images").mkdir()
    lines = []
    for i, (color, shape) in enumerate((c, s) for c in COLORS for s in SHAPES):
        name = f"images/{i}.png"
        draw_sample(root / name, color, shape)
        lines += [
            {"image": name, "question": "what is the color of the shape?", "answer": color},
            {"image": name, "question": "what is the shape?", "answer": shape},
            {"image": name, "question": f"is there a {shape} in the image?", "answer": "yes"},
            {"image": name, "question": "is there a red shape?", "answer": "yes" if color == "red" else "no"},
        ]
    path = root / "vqa.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def lora_model_and_dataset(recipe, vqa: Path):
    """The recipe's model in training mode (seeded), its LoRA given weights (``lora_B`` starts at zero, so a
    check would not cover LoRA), and the VQA file's image rows and tokenized dataset."""
    from adaptkit.data.collate import VQADataset
    from adaptkit.data.formats import load_jsonl
    from adaptkit.model import build_model

    torch.manual_seed(0)
    model = build_model(recipe).train()
    with torch.no_grad():
        for name, p in model.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    samples = load_jsonl(vqa).samples
    rows = {path: i for i, path in enumerate(dict.fromkeys(s.image for s in samples))}
    return model, rows, VQADataset(samples, rows, model.tokenizer, recipe.data.prompt_template)


def injected_model_and_batches(overrides, vqa: Path, extra=()):
    """The shipped recipe's model with the image entering LM layer 1 (LoRA from step 0, given weights), and
    seven of ``vqa``'s questions as a plain batch, the same packed 3 to a row, random image features, and
    the items."""
    from adaptkit.data.collate import collate_packed, collate_train
    from adaptkit.recipes import load_recipe

    recipe = load_recipe(
        Path(__file__).resolve().parent.parent / "recipes" / "easyvqa_qformer_lora.yaml",
        [
            *overrides,
            "adapter.inject_layer=1",
            "adapter.qformer.text_conditioned=false",
            "lora.start_step=0",
            *extra,
        ],
    )
    model, rows, dataset = lora_model_and_dataset(recipe, vqa)
    items = [dataset[i] for i in [0, 1, 2, 3, 4, 5, 8]]
    pad = model.tokenizer.pad_token_id
    feats = torch.randn(len(rows), 4, 1280)
    return model, collate_train(items, pad), collate_packed(items, pad, pack=3), feats, items


def loss_and_grads(model, feats, batch, **kw):
    """A batch's training loss and the gradients it gives, by parameter name."""
    model.zero_grad(set_to_none=True)
    loss = loss_of(
        model, feats[batch["image"]], batch["input_ids"], batch["attention_mask"], batch["labels"], **kw
    )
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def loss_of(model, features, input_ids, attention_mask, labels=None, **kw):
    """The training loss of a batch given as tensors (``MultimodalModel.forward`` reads a typed ``Batch``)."""
    from adaptkit.model.batch import Batch

    return model(Batch(features, input_ids, attention_mask, labels, **kw)).loss


@torch.no_grad()
def greedy_by_recomputing(model, feats, input_ids, attention_mask, steps):
    """Greedy decoding that reruns the whole sequence for every token (no KV cache), left-padded rows:
    the reference every cached generation path is checked against. Returns tokens and log-probabilities."""
    ids, mask, tokens, logps = input_ids, attention_mask, [], []
    for _ in range(steps):
        logits = model.logits(feats, ids, mask)[0][:, -1].float().log_softmax(-1)
        token = logits.argmax(-1)
        tokens.append(token)
        logps.append(logits.gather(-1, token[:, None])[:, 0])
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return torch.stack(tokens, dim=1), torch.stack(logps, dim=1)


# Every adapter kind at the tiny fixtures' size (the Q-Former's and the resampler's sections alike).
TINY_ADAPTERS = [
    f"adapter.{kind}.{key}"
    for kind in ("qformer", "resampler")
    for key in ("num_queries=4", "num_layers=1", "hidden_size=32", "num_heads=4")
] + ["adapter.xattn.num_heads=4"]

# The path the shipped recipe took before its soft tokens moved up the LM: soft tokens at the LM's input,
# prompt-conditioned queries, one question per sequence, plain shuffle, the longer prompt. Tests of that path
# add these.
AT_INPUT = [
    "adapter.inject_layer=0",
    "adapter.qformer.text_conditioned=true",
    "pack_questions=1",
    "length_grouping=1",
    "data.prompt_template=Question: {question} Answer:",
]


def train_crashing_at_save(argv: list[str], save: int) -> None:
    """``adaptkit train *argv`` killed (KeyboardInterrupt) while it writes its ``save``-th checkpoint; the
    checkpoints before it are committed."""
    from adaptkit import checkpoint as ckpt
    from adaptkit.cli import main

    real_commit, calls = ckpt.commit, []

    def crash(tmp, keep):
        calls.append(tmp)
        if len(calls) == save:
            raise KeyboardInterrupt(f"injected crash during checkpoint save {save}")
        return real_commit(tmp, keep)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ckpt, "commit", crash)
        with pytest.raises(KeyboardInterrupt):
            main(["train", *argv])


def overrides_for(lm_dir: Path, vision_pth: Path, vqa: Path, root: Path) -> list[str]:
    """Recipe overrides that point every part at the tiny fixtures, writing under ``root``.

    Everything else follows the shipped recipe (soft tokens injected above the LM's lowest layers, packed
    questions, length-grouped batches); only the injection layer is scaled down to the 2-layer tiny LM.
    """
    return [
        f"output_dir={root / 'run'}",
        f"vision.weights={vision_pth}",
        "vision.image_size=64",
        "vision.extra_layers=[]",
        "data.augment.views=0",  # augmented views have their own tests (tests/test_augment.py)
        f"language.name={lm_dir}",
        *TINY_ADAPTERS,
        "adapter.inject_layer=1",  # the recipe's 20 is out of range for 2 layers
        "lora.r=4",
        "lora.alpha=8",
        "lora.dropout=0",
        "lora.target_modules=[q_proj,v_proj]",
        f"data.train={vqa}",
        f"data.eval={vqa}",
        f"feature_cache_dir={root / 'features'}",
        "max_steps=4",
        "batch_size=4",
        "warmup_steps=1",
        "log_every=2",
        "eval_limit=8",
        "eval_batch_size=4",
        "max_new_tokens=3",
        "compile=false",  # compiled layers are tested on their own (tests/test_objectives.py)
    ]


@pytest.fixture
def tiny_overrides(tiny_lm_dir, tiny_mobilenet_pth, tiny_vqa, tmp_path) -> list[str]:
    """Recipe overrides that point every part at the tiny fixtures."""
    return overrides_for(tiny_lm_dir, tiny_mobilenet_pth, tiny_vqa, tmp_path)


def _train_tiny(root: Path, overrides: list[str]) -> Path:
    from adaptkit.recipes import load_recipe
    from adaptkit.train import train

    # LoRA trains from step 0 at a high rate so its merge visibly changes the LM.
    extra = ["lora.start_step=0", "lr_lora=0.02", "max_steps=40", "eval_every=0"]
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "easyvqa_qformer_lora.yaml"
    train(load_recipe(recipe, overrides + extra))
    return root / "run"


@pytest.fixture(scope="session")
def tiny_run(tiny_lm_dir, tiny_mobilenet_pth, tiny_vqa, tmp_path_factory) -> Path:
    """A finished tiny run directory (fp32 LM with trained LoRA), shared by the tests that read runs."""
    root = tmp_path_factory.mktemp("tiny_run")
    return _train_tiny(root, overrides_for(tiny_lm_dir, tiny_mobilenet_pth, tiny_vqa, root))


@pytest.fixture(scope="session")
def tiny_run_4bit(tiny_lm_dir, tiny_mobilenet_pth, tiny_vqa, tmp_path_factory) -> Path:
    """The same tiny run, trained on a 4-bit (bitsandbytes NF4) LM."""
    root = tmp_path_factory.mktemp("tiny_run_4bit")
    overrides = overrides_for(tiny_lm_dir, tiny_mobilenet_pth, tiny_vqa, root) + ["language.quant=4bit"]
    return _train_tiny(root, overrides)


@pytest.fixture(scope="session")
def tiny_text_encoder_dir(tmp_path_factory) -> Path:
    """A 2-layer random BERT encoder with a word-level tokenizer, saved as a Hugging Face folder."""
    from transformers import BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny_text_encoder")
    tokenizer = _tiny_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_captions(tiny_vqa) -> Path:
    """A caption JSONL file over the tiny VQA images (6 images, 2 captions each, labelled)."""
    lines = [
        {
            "image": f"images/{i}.png",
            "captions": [f"a {color} {shape}", f"is there a {color} {shape}"],
            "label": f"{color} {shape}",
        }
        for i, (color, shape) in enumerate((c, s) for c in COLORS for s in SHAPES)
    ]
    path = tiny_vqa.parent / "captions.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


RETRIEVAL_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "easyvqa_retrieval.yaml"


def retrieval_overrides(lm_dir: Path, vision_pth: Path, encoder_dir: Path, captions: Path, root: Path):
    """Overrides pointing the retrieval recipe at the tiny fixtures, writing under ``root``."""
    return [
        f"output_dir={root / 'run'}",
        f"vision.weights={vision_pth}",
        "vision.image_size=64",
        "vision.extra_layers=[]",
        f"language.name={lm_dir}",
        f"text_encoder.name={encoder_dir}",
        *TINY_ADAPTERS,
        "objectives.embed_dim=16",
        f"data.train={captions}",
        f"data.eval={captions}",
        f"feature_cache_dir={root / 'features'}",
        "max_steps=4",
        "batch_size=4",
        "warmup_steps=1",
        "log_every=2",
        "eval_every=0",
        "checkpoint_every=2",
    ]


def demo_module():
    """app/demo.py loaded the way `adaptkit demo` loads it (a script beside the package)."""
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "app" / "demo.py"
    spec = importlib.util.spec_from_file_location("adaptkit_demo_app", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A local TCP port free at the moment of asking."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``accelerate launch`` two gloo CPU processes running ``adaptkit <argv>``, their output in files (a
    process left behind cannot hold the test up on a pipe). A launch past ``timeout``, or a process of it
    (the ranks run in sessions of their own; image workers) still alive 10 s after the launcher exited,
    fails the test with every such process's Python stacks (faulthandler, on SIGABRT), and is killed, so
    a hang says where it hung and leaves nothing running."""
    launch = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--num_cpu_threads_per_process", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "-m", "adaptkit", *argv,
    ]  # fmt: skip
    # On CPU, Accelerate sets up gloo DDP for torchrun-launched processes when ACCELERATE_USE_CPU=1.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    marker = f"{os.getpid()}-{time.monotonic_ns()}"  # every process of the launch inherits it
    env.update(PYTHONFAULTHANDLER="1", ADAPTKIT_TEST_LAUNCH=marker)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(launch, stdout=out, stderr=err, text=True, env=env)
        try:
            proc.wait(timeout=timeout)
            left = _launched(marker, wait=10.0)
            problem = left and "left these processes behind 10 s after it exited"
        except subprocess.TimeoutExpired:
            left, problem = _launched(marker), f"ran past {timeout} s; its processes"
        if problem:
            for sig in (signal.SIGABRT, signal.SIGKILL):  # SIGABRT: every thread's stack to stderr
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                time.sleep(3)
            proc.wait()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if problem:
        listing = "\n".join(f"{pid} {args}" for pid, args in left.items())
        pytest.fail(f"the two-process launch {problem}:\n{listing}\nits output's end:\n{stderr[-12000:]}")
    return subprocess.CompletedProcess(launch, proc.returncode, stdout, stderr)


def _launched(marker: str, wait: float = 0.0) -> dict[int, str]:
    """The live (not zombie) processes whose environment holds ``ADAPTKIT_TEST_LAUNCH=marker``, after up
    to ``wait`` seconds for them to end: pid -> command line. Linux's /proc."""
    tag, deadline = f"ADAPTKIT_TEST_LAUNCH={marker}".encode(), time.monotonic() + wait
    while True:
        left = {}
        for proc in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError):
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z" and tag in (proc / "environ").read_bytes().split(b"\0"):
                    left[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:300]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)
