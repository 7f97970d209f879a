"""Training throughput: adaptkit's step against the plain way, same backbones and batches, one process.

Two ways to train the same trainable parts (the recipe's Q-Former + LoRA on the frozen LM) on the
same questions, batch for batch, each in a fresh process of its own (its peak memory its own):

- **adaptkit**: features of each image looked up from the frozen-feature cache (filled once, timed
  separately), pre-tokenized short prompts, batches grouped by length as the recipe's
  ``length_grouping`` says (the same samples, batched differently), logits only at answer tokens
  (``MultimodalModel.forward``).
- **reference**, written here the way a practitioner does it with stock transformers + peft: each
  step decodes and preprocesses the images and runs the frozen backbone (under ``no_grad``), formats
  every sample with the LM's chat template, pads the batch with the tokenizer, and calls the HF model
  with ``labels`` (full-vocabulary logits at every position).

Both sides run forward, backward and an AdamW step on identical parameter sets. Also measured in
the same run: this machine's fp32 (or bf16 on CUDA) matmul peak, and adaptkit's *useful* FLOPs per
step (every sample run alone, so padding counts for nothing) as a fraction of that peak. The last
stdout line is one JSON object.

    python benchmarks/train_throughput.py                   # the default recipe's sizes, 20 timed steps
    python benchmarks/train_throughput.py --steps 20 language.quant=4bit
    python benchmarks/train_throughput.py --adapter xattn   # recipes/easyvqa_xattn_lora.yaml
    python benchmarks/train_throughput.py --data instruct   # distinct 100-300-token instruction texts

**What a run pays once** is counted too: encoding every training image (and its augmented views) into
the feature cache, the lower-layer states of every distinct text where the run keeps them
(``lower_states``), and compiling. Each is measured on the benchmark's samples and scaled to one epoch
of the training data (encoding on the path such an epoch takes: through the compiled backbone where
``vision.compile`` and its size call for it, its compile counted once). ``adaptkit_samples_per_s_epoch``
is one epoch's samples over those costs plus the epoch's steps at the warm rate, and ``ratio_epoch``
compares it with the reference (which pays nothing once: it decodes and encodes its images in every step).

``--data instruct`` trains on instruction-style data (``benchmarks/instruction_data.py``: easy-VQA's
images and answers behind distinct contexts of 100-300 LM tokens; ``--instruct-questions`` of them form
the epoch). The reference then accumulates gradients over micro-batches of ``--ref-micro`` samples, as
a practitioner makes such batches fit; adaptkit runs as ``adaptkit train`` would (``max_batch_tokens``).

``--adapter KIND`` takes that adapter's shipped recipe (``recipes/easyvqa_<KIND>_lora.yaml``); the
reference side then trains the same adapter the plain way: soft tokens in front of the prompt, or, for
``xattn``, the same gated blocks hooked into the stock peft-wrapped LM with no soft token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from encoding import timed
from torch.utils.flop_counter import FlopCounterMode

from adaptkit.data.collate import pack_runs
from adaptkit.data.encoding import BatchEncoder, encode_images
from adaptkit.data.feature_cache import file_key
from adaptkit.data.features import FeatureBank
from adaptkit.data.images import open_image
from adaptkit.data.sampling import epoch_batches, shown_views
from adaptkit.data.splits import subset
from adaptkit.model import build_model, prepare_for_training
from adaptkit.model.batch import Batch
from adaptkit.model.decoder import IMAGE_KWARG
from adaptkit.model.fusion import CrossAttention
from adaptkit.perf import matmul_peak, peak_memory_mb, significant, sync
from adaptkit.recipes import load_recipe
from adaptkit.tasks import get_task
from adaptkit.train import build_optimizer
from adaptkit.train.loop import token_chunks

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---- the two ways ----------------------------------------------------------------------------


def epoch_views(recipe, task, data, tokenizer) -> int:
    """The augmented views one epoch of ``data`` looks up: `adaptkit train` encodes those alone
    (``shown_views`` over the global batches it draws; every view where its batches are a plain shuffle;
    none where ``data.augment.only_for`` turns them off for this data)."""
    augment = recipe.data.train_augment()
    views = augment.views if augment is not None else 0
    rows = {image: i for i, image in enumerate(dict.fromkeys(s.image for s in data))}
    if not views:
        return 0
    ds = task.dataset(data, rows, tokenizer)
    batches = epoch_batches(recipe, ds.image_rows, task.lengths(ds), recipe.batch_size)
    if batches is None:
        return views * len(rows)
    shown = shown_views(
        batches, ds.image_rows, len(rows), views, recipe.seed, len(batches), recipe.grad_accum_steps
    )
    return int(shown[1:].sum())


def encoding_cost(vision, recipe, samples, epoch, device, shown: int, batches: int = 10) -> dict:
    """What encoding one epoch's images and the ``shown`` views its steps look up costs, on the path
    `adaptkit train` takes for that epoch (compiled where ``vision.compile`` and its size call for it,
    see ``FeatureBank.compute``): the first batch of 64 (compiling, when compiled) and ``batches - 1``
    more, timed apart, from the benchmark's images and their augmented views."""
    augment = recipe.data.train_augment()
    views = augment.views if augment is not None else 0
    epoch_images = len({s.image for s in epoch})
    # training compiles its encoder for the images, or else for the views, where either reaches the threshold
    encoder = BatchEncoder.for_work(vision, device, 64, recipe.vision.compile, max(epoch_images, shown))
    paths = list(dict.fromkeys(s.image for s in samples))
    keys = {p: file_key(p) for p in paths} if views else {}
    items = [(p, v) for v in range(views + 1) for p in paths][: 64 * batches]
    origins = {s.image: s.origin for s in samples}
    first, per_item, _ = timed(encoder, items, origins, augment, keys, 64)  # benchmarks/encoding.py
    return {
        "encode_compiled": encoder.graph is not None,
        "encode_s_per_image": per_item,
        "encode_compile_s": max(0.0, first - 64 * per_item) if encoder.graph is not None else 0.0,
        "epoch_images": epoch_images,
        "epoch_views": shown,
    }


def adaptkit_side(recipe, samples, batches, device, steps, warmup, autocast, count_flops=True, epoch=None):
    """adaptkit's step; returns timings, tokens, one-time costs and (``count_flops``) useful FLOPs per
    step. ``epoch``: the training set's texts (one per sample), for ``lower_states`` to decide as
    ``adaptkit train`` does over one epoch."""
    model = build_model(recipe, device)
    model.train()
    model.lora_active = True  # the slower phase: LoRA on
    task = get_task(recipe)
    shown = epoch_views(recipe, task, epoch or samples, model.tokenizer)
    encoding = encoding_cost(model.vision, recipe, samples, epoch or samples, device, shown)
    origins = {s.image: s.origin for s in samples}
    bank = FeatureBank.compute(
        model.vision,
        [s.image for s in samples],
        origins,
        device,
        disable_progress=True,
        dtype=model.feature_dtype,
    )
    model.adapter.set_feature_stats(*bank.stats())
    ds = task.dataset(samples, bank.rows, model.tokenizer)
    task.setup_objectives(model, ds)  # the recipe's objectives, as `adaptkit train` sets them up
    # As `adaptkit train` does: the lower-layer states kept or recomputed (decided over one epoch of the
    # training texts; kept ones filled below, before timing) and compile (the first warm-up step compiles).
    texts = [tuple(p + t) for p, t in zip(ds.prompt_ids, ds.target_ids)]
    if epoch is not None:  # the whole training set's texts
        epoch = task.texts(task.dataset(epoch, {s.image: 0 for s in epoch}, model.tokenizer))
    epoch = texts if epoch is None else epoch
    lower_states = prepare_for_training(model, recipe, epoch, len(epoch))
    lower_s, misses_before = 0.0, 0
    if lower_states is not None:
        # Training computes each distinct text's lower-layer states once, in its first steps (easy-VQA:
        # 273 texts); computed here before timing, like the image features, so steps are timed warm.
        start = time.perf_counter()
        lower_states.fill(texts, model.base_lm.get_input_embeddings())
        lower_s, misses_before = time.perf_counter() - start, lower_states.misses
    # The same samples, batched the way `adaptkit train` batches them.
    lengths = task.lengths(ds)
    pack = recipe.pack_questions
    collate = task.collate(model.tokenizer.pad_token_id, pack)
    sampler = epoch_batches(recipe, ds.image_rows, lengths, len(batches[0]))
    if sampler is not None:
        batches = sampler.batches(0)
    # The optimizer `adaptkit train` builds (fused AdamW where torch has the kernel).
    optimizer = build_optimizer(
        [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 1e-5}], 0.0
    )

    budget = recipe.max_batch_tokens if model.objectives.active() == ["lm"] else 0

    def step(batch_ids):
        batch = collate([ds[i] for i in batch_ids])
        feats = bank.lookup(batch["image"])
        for rows, part, weight in token_chunks(batch, budget):  # as `adaptkit train` runs a batch
            with autocast():
                keys = ("input_ids", "attention_mask", "labels", "answer_class", "segment_ids", "positions")
                lm = {k: part[k].to(device) for k in keys if k in part}
                loss = model(Batch.of(feats[rows], lm)).loss * weight
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return batch

    first = time.perf_counter()
    times, tokens, padded = _timed(step, batches, device, steps, warmup, model.adapter.num_tokens)
    warmup_s = time.perf_counter() - first - sum(times)
    one_time = {
        "times": times,
        "peak_mem_mb": peak_memory_mb(device),  # before the FLOP counting below
        **encoding,
        "lower_states_s_per_text": lower_s / max(len(set(texts)), 1),
        "lower_states_kept": lower_states is not None,
        # compiling: the warm-up steps' time beyond what warm steps take
        "compile_s": max(0.0, warmup_s - warmup * sum(times) / len(times)) if recipe.compile else 0.0,
        "warmup_s": round(warmup_s, 2),
        # Texts whose kept lower-layer states the timed steps still had to compute: 0 when kept.
        "lower_state_misses": None if lower_states is None else lower_states.misses - misses_before,
    }
    if not count_flops:
        return one_time
    timed = batches[warmup : warmup + steps]
    # Useful FLOPs: every timed sample as if alone (no padding at all), counted by torch; with packing,
    # every packed row alone (its image's soft tokens once, its questions, no padding). The FLOPs of
    # a row depend only on its token lengths, so each distinct shape is counted once.
    by_shape: dict[tuple[int, ...], list[list[int]]] = {}
    for b in timed:
        rows = [[b[k] for k in run] for run in pack_runs([ds.image_rows[i] for i in b], pack)]
        for row in rows if pack > 1 else [[i] for i in b]:
            shape = tuple(n for i in row for n in (len(ds.prompt_ids[i]), len(ds.target_ids[i])))
            by_shape.setdefault(shape, []).append(row)
    useful = 0
    # FLOPs are counted on the eager path (the same arithmetic; torch's counter sees eager ops).
    with torch.compiler.set_stance("force_eager"):
        for members in by_shape.values():
            counter = FlopCounterMode(display=False)
            with counter:
                step(members[0])
            useful += counter.get_total_flops() * len(members)
        # Executed FLOPs: the timed batches as run (padding included).
        counter = FlopCounterMode(display=False)
        with counter:
            for batch_ids in timed:
                step(batch_ids)
        executed = counter.get_total_flops()
    useful_per_step, executed_per_step = useful / steps, executed / steps
    return {
        **one_time,
        "tokens_per_sample": tokens / (steps * len(batches[0])),
        "padded_tokens_per_sample": padded / (steps * len(batches[0])),
        "useful_flops_per_step": useful_per_step,
        "executed_flops_per_step": executed_per_step,
    }


def reference_side(recipe, samples, batches, device, steps, warmup, autocast, micro=0):
    """The plain way with stock transformers + peft (see the module docstring); ``micro`` > 0: each batch
    as micro-batches of that many samples, their losses divided by their number and gradients
    accumulated, then one AdamW step."""
    from peft import LoraConfig, get_peft_model

    # The plain way puts the soft tokens at the LM's input (no adapter.inject_layer); a cross-attention
    # adapter's blocks stay where the recipe puts them (hooked into the LM), the layers below run too.
    plain = replace(
        recipe, lora=replace(recipe.lora, enabled=False), adapter=replace(recipe.adapter, inject_layer=0)
    )
    base = build_model(plain, device)
    cross = isinstance(base.fusion, CrossAttention)
    vision, adapter, tokenizer = base.vision, base.adapter, base.tokenizer
    lm = get_peft_model(
        base.lm,
        LoraConfig(
            r=recipe.lora.r,
            lora_alpha=recipe.lora.alpha,
            lora_dropout=recipe.lora.dropout,
            target_modules=list(recipe.lora.target_modules),
            task_type="CAUSAL_LM",
        ),
    )
    adapter.train()
    lm.train()
    tokenizer.padding_side = "right"
    embed = lm.get_input_embeddings()
    optimizer = torch.optim.AdamW(
        [p for p in list(adapter.parameters()) + list(lm.parameters()) if p.requires_grad], lr=1e-5
    )

    def micro_step(batch_ids, scale):
        batch = [samples[i] for i in batch_ids]
        with torch.no_grad():
            feats = encode_images(vision, [open_image(s.image) for s in batch], device)
        if tokenizer.chat_template:
            prompts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": s.question}], tokenize=False, add_generation_prompt=True
                )
                for s in batch
            ]
        else:  # a base LM without a chat template: the recipe's prompt
            prompts = [recipe.data.prompt_template.format(question=s.question) + " " for s in batch]
        full = [p + s.answer + tokenizer.eos_token for p, s in zip(prompts, batch)]
        enc = tokenizer(full, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        prompt_lens = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        labels = enc["input_ids"].clone()
        labels[enc["attention_mask"] == 0] = -100
        for row, n in enumerate(prompt_lens):
            labels[row, :n] = -100
        with autocast():
            text = embed(enc["input_ids"])
            soft = adapter(feats, text, enc["attention_mask"] * (labels == -100))  # prompt only
            image = {}
            if cross:  # the image tokens go to the blocks (carried by the LM call); none in the sequence
                image, soft = {IMAGE_KWARG: soft}, soft[:, :0]
            embeds = torch.cat([soft.to(text.dtype), text], dim=1)
            ones = torch.ones(soft.shape[:2], dtype=enc["attention_mask"].dtype, device=device)
            mask = torch.cat([ones, enc["attention_mask"]], dim=1)
            soft_labels = torch.full(soft.shape[:2], -100, dtype=labels.dtype, device=device)
            out = lm(
                inputs_embeds=embeds, attention_mask=mask, labels=torch.cat([soft_labels, labels], 1), **image
            )
        (out.loss * scale).backward()
        return mask[:, soft.shape[1] :]

    def step(batch_ids):
        size = micro or len(batch_ids)
        parts = [batch_ids[i : i + size] for i in range(0, len(batch_ids), size)]
        masks = [micro_step(part, 1 / len(parts)) for part in parts]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        width = max(m.shape[1] for m in masks)  # token counts: each micro-batch as padded
        return {
            "attention_mask": torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in masks]),
            "padded_slots": sum(m.numel() for m in masks),
        }

    times, tokens, padded = _timed(step, batches, device, steps, warmup, adapter.num_tokens)
    return {
        "times": times,
        "peak_mem_mb": peak_memory_mb(device),
        "tokens_per_sample": tokens / (steps * len(batches[0])),
        "padded_tokens_per_sample": padded / (steps * len(batches[0])),
    }


def _timed(step, batches, device, steps, warmup, n_soft):
    """Step times, and LM tokens without and with padding (soft tokens included: one copy per row)."""
    times, tokens, padded = [], 0, 0
    for n, batch_ids in enumerate(batches[: warmup + steps]):
        sync(device)
        start = time.perf_counter()
        batch = step(batch_ids)
        sync(device)
        if n >= warmup:
            times.append(time.perf_counter() - start)
            soft = n_soft * batch["attention_mask"].shape[0]
            tokens += int(batch["attention_mask"].sum()) + soft
            padded += batch.get("padded_slots", batch["attention_mask"].numel()) + soft
    return times, tokens, padded


def _image_subset(data, n: int, seed: int) -> list:
    """``n`` samples made of whole images' questions (images in a seeded random order)."""
    by_image: dict[str, list] = {}
    for sample in data:
        by_image.setdefault(sample.image, []).append(sample)
    images = list(by_image)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)).tolist()
    return [s for k in order for s in by_image[images[k]]][:n]


def instruction_file(questions: int, seed: int = 0) -> Path:
    """The instruction-style data of ``--data instruct``, generated once into the cache."""
    from adaptkit.assets import cache_dir

    path = cache_dir() / "benchmarks" / f"instruct_{questions}_{seed}" / "questions.jsonl"
    if not path.exists():
        subprocess.run(
            [sys.executable, str(Path(__file__).with_name("instruction_data.py")), str(path.parent)]
            + ["--questions", str(questions), "--seed", str(seed), "--tokenizer", "embedded"],
            check=True,
        )
    return path


def epoch_costs(ours: dict, data, recipe, warm_rate: float) -> dict:
    """adaptkit's one-time costs scaled to one epoch of ``data`` (every image encoded, and the augmented
    views the epoch's steps look up; every distinct text's lower-layer states where kept; compiling) and
    the epoch's samples/s."""
    items = ours["epoch_images"] + ours["epoch_views"]
    encode = ours["encode_compile_s"] + ours["encode_s_per_image"] * items
    lower = 0.0
    if ours["lower_states_kept"]:
        lower = ours["lower_states_s_per_text"] * len({(s.question, s.answer) for s in data})
    one_time = encode + lower + ours["compile_s"]
    seconds = one_time + len(data) / warm_rate
    return {
        "epoch_samples": len(data),
        "one_time_s": round(one_time, 1),
        "one_time_encode_s": round(encode, 1),
        "one_time_encode_compiled": ours["encode_compiled"],
        "one_time_encoded": f"{ours['epoch_images']} images + {ours['epoch_views']} augmented views",
        "one_time_lower_states_s": round(lower, 1),
        "one_time_compile_s": round(ours["compile_s"], 1),
        "adaptkit_lower_states": "kept" if ours["lower_states_kept"] else "recomputed",
        "adaptkit_samples_per_s_epoch": round(len(data) / seconds, 2),
    }


def _run_side(side: str, args: argparse.Namespace) -> dict:
    """One side, timed in a fresh process of its own, so that each side's peak memory (RSS on CPU, the
    allocator's peak on CUDA) is its own and the two never hold memory at once; its log shows as it runs."""
    cmd = [sys.executable, __file__, *args.overrides, "--recipe", args.recipe, "--side", side]
    cmd += ["--ref-micro", str(args.ref_micro), "--flops", args.flops, "--steps", str(args.steps)]
    cmd += ["--warmup", str(args.warmup)] + (["--device", args.device] if args.device else [])
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if out.returncode:
        raise SystemExit(f"the {side} side failed (exit {out.returncode}); its log is above")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    rate = len(args.batch_ids[0]) * len(result["times"]) / sum(result["times"])
    print(f"{side}: {rate:.2f} samples/s, peak mem {result['peak_mem_mb']} MB", file=sys.stderr, flush=True)
    return result


def warmup_warning(compiled: bool, warmup: int) -> str | None:
    """Why ``warmup`` untimed steps are too few for a compiled step, or None: the first step compiles and
    the second batch's new length recompiles (Dynamo marks it dynamic), so both must be untimed."""
    if compiled and warmup < 2:
        return (
            f"warning: --warmup {warmup} with compile=true: a timed step will include the recompile for "
            "the second batch length (tens of seconds here) and under-read the speed; use --warmup 2 or more"
        )
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. language.quant=4bit")
    parser.add_argument("--recipe", default=None, help="default: recipes/easyvqa_<adapter>_lora.yaml")
    parser.add_argument(
        "--adapter", default="qformer", help="qformer | projector | resampler | xattn: that adapter's recipe"
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side")
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed steps per side first; with compile at least 2 (the first compiles, the second "
        "batch's new length recompiles with dynamic shapes)",
    )
    parser.add_argument(
        "--data",
        choices=["recipe", "instruct"],
        default="recipe",
        help="recipe: the recipe's data.train (easy-VQA by default); instruct: generated instruction-style "
        "data with distinct texts (benchmarks/instruction_data.py)",
    )
    parser.add_argument("--instruct-questions", type=int, default=4000, help="--data instruct: its size")
    parser.add_argument(
        "--ref-micro",
        type=int,
        default=None,
        help="reference micro-batch size, gradients accumulated to the batch (default: 8 with --data "
        "instruct, else the whole batch)",
    )
    parser.add_argument(
        "--flops",
        choices=["auto", "on", "off"],
        default="auto",
        help="count useful FLOPs (every sample shape run alone; auto: off with --data instruct, whose "
        "distinct lengths make that a step per sample)",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--peak-seconds", type=float, default=3.0, help="time spent measuring matmul peak")
    parser.add_argument(
        "--side",
        choices=["adaptkit", "reference"],
        default=None,
        help="(internal) run one side alone and print its figures",
    )
    args = parser.parse_args()
    args.recipe = args.recipe or f"recipes/easyvqa_{args.adapter}_lora.yaml"
    instruct = args.data == "instruct"
    if instruct:
        args.overrides = [*args.overrides, f"data.train={instruction_file(args.instruct_questions)}"]
    if args.ref_micro is None:
        args.ref_micro = 8 if instruct else 0
    count_flops = args.flops == "on" or (args.flops == "auto" and not instruct)
    recipe = load_recipe(args.recipe, args.overrides)
    warning = None if args.side else warmup_warning(recipe.compile, args.warmup)
    if warning:
        print(warning, file=sys.stderr)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = device.type == "cuda" and recipe.mixed_precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    torch.manual_seed(recipe.seed)
    data = get_task(recipe).load(recipe.data.train, recipe.data.on_bad_sample).samples
    n_batches = args.warmup + args.steps
    if recipe.pack_questions > 1:  # whole images' questions, as training packs them
        samples = _image_subset(data, n_batches * recipe.batch_size, recipe.seed)
    else:
        samples = subset(data, n_batches * recipe.batch_size, seed=recipe.seed)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(recipe.seed)).tolist()
    batches = [order[i * recipe.batch_size : (i + 1) * recipe.batch_size] for i in range(n_batches)]

    if args.side:
        side = adaptkit_side if args.side == "adaptkit" else reference_side
        kwargs = (
            {"count_flops": count_flops, "epoch": data}
            if side is adaptkit_side
            else {"micro": args.ref_micro}
        )
        print(json.dumps(side(recipe, samples, batches, device, args.steps, args.warmup, autocast, **kwargs)))
        return

    peak, peak_shape = matmul_peak(device, dtype, args.peak_seconds)
    print(
        f"device {device} ({torch.get_num_threads()} threads), matmul peak {peak / 1e9:.1f} GFLOP/s "
        f"({peak_shape}, {str(dtype).removeprefix('torch.')})",
        flush=True,
    )

    args.batch_ids = batches
    ours, ref = _run_side("adaptkit", args), _run_side("reference", args)
    mem = {"adaptkit": ours["peak_mem_mb"], "reference": ref["peak_mem_mb"]}

    def rate(side):
        return recipe.batch_size * len(side["times"]) / sum(side["times"])

    ours_rate, ref_rate = rate(ours), rate(ref)
    epoch = epoch_costs(ours, data, recipe, ours_rate)
    step_s = sum(ours["times"]) / len(ours["times"])
    result = {
        "device": str(device),
        "recipe": args.recipe,
        "adapter": recipe.adapter.kind,
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "batch_size": recipe.batch_size,
        "steps": args.steps,
        "adaptkit_samples_per_s": round(ours_rate, 2),
        "reference_samples_per_s": round(ref_rate, 2),
        "ratio": round(ours_rate / ref_rate, 2),
        "data": args.data if not instruct else f"instruct ({args.instruct_questions} questions)",
        "reference_micro_batch": args.ref_micro or recipe.batch_size,
        **epoch,
        "ratio_epoch": round(epoch["adaptkit_samples_per_s_epoch"] / ref_rate, 2),
        "adaptkit_tokens_per_sample": round(ours["tokens_per_sample"], 1),
        "adaptkit_padded_tokens_per_sample": round(ours["padded_tokens_per_sample"], 1),
        "reference_tokens_per_sample": round(ref["tokens_per_sample"], 1),
        "reference_padded_tokens_per_sample": round(ref["padded_tokens_per_sample"], 1),
        "adaptkit_lower_state_misses": ours["lower_state_misses"],
        "adaptkit_compiled": recipe.compile,
        "adaptkit_warmup_s": ours["warmup_s"],
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "adaptkit_peak_mem_mb": mem["adaptkit"],
        "reference_peak_mem_mb": mem["reference"],
    }
    if count_flops:
        useful_rate = ours["useful_flops_per_step"] / step_s
        result |= {
            "useful_gflops_per_step": significant(ours["useful_flops_per_step"] / 1e9),
            "executed_gflops_per_step": significant(ours["executed_flops_per_step"] / 1e9),
            "useful_gflops_per_s": significant(useful_rate / 1e9),
            "useful_flops_fraction": significant(useful_rate / peak),
        }
    print(
        f"adaptkit  {ours_rate:6.2f} samples/s  ({result['adaptkit_tokens_per_sample']} tokens/sample, "
        f"peak mem {mem['adaptkit']} MB)\n"
        f"reference {ref_rate:6.2f} samples/s  ({result['reference_tokens_per_sample']} tokens/sample, "
        f"peak mem {mem['reference']} MB)\n"
        f"ratio {result['ratio']}x warm; {result['ratio_epoch']}x over one epoch of "
        f"{epoch['epoch_samples']} samples with adaptkit's one-time costs ({epoch['one_time_s']} s)",
        flush=True,
    )
    if count_flops:
        print(
            f"adaptkit useful {result['useful_gflops_per_s']} GFLOP/s = "
            f"{100 * result['useful_flops_fraction']:.1f}% of the measured matmul peak",
            flush=True,
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
