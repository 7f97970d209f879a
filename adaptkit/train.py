"""The training loop on HF Accelerate: CPU, one GPU, or many through ``accelerate launch``.

AdamW with separate learning rates for the fusion adapter and LoRA, linear warmup then cosine decay,
gradient accumulation, clipping, periodic evaluation, a tqdm bar with loss and samples/s, and a
``metrics.jsonl`` line per logged step. Freezing is asserted, not assumed: the optimizer must hold
exactly the trainable parameters, and the frozen weights' digest must be unchanged at the end.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from adaptkit.config import Recipe, recipe_to_yaml
from adaptkit.data.collate import collate_train
from adaptkit.data.sampling import LengthGroupedBatches, padding_fraction
from adaptkit.evaluation import evaluate_vqa
from adaptkit.inference import ANSWERS_FILE, answer_set
from adaptkit.model import ADAPTER_FILE, LORA_DIR, build_model, count_parameters, frozen_fingerprint
from adaptkit.perf import peak_memory_mb, reset_peak_memory
from adaptkit.runs import RECIPE_FILE, feature_cache_root, prepare_split, write_json

log = logging.getLogger("adaptkit")


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record arrives (pytest and notebooks swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _setup_logging(run_dir: Path, main: bool) -> None:
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    if not main:
        log.addHandler(logging.NullHandler())
        return
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    for handler in (logging.FileHandler(run_dir / "train.log"), _CurrentStderr()):
        handler.setFormatter(fmt)
        log.addHandler(handler)


def param_groups(model, recipe: Recipe) -> list[dict]:
    """Two AdamW groups (adapter, LoRA), checked to hold exactly the trainable parameters."""
    adapter = [p for p in model.adapter.parameters() if p.requires_grad]
    lora = [p for n, p in model.lm.named_parameters() if p.requires_grad]
    bad = [n for n, p in model.lm.named_parameters() if p.requires_grad and "lora_" not in n]
    if bad:
        raise RuntimeError(f"non-LoRA LM parameters are trainable: {bad[:5]}")
    trainable = {id(p) for _, p in model.trainable_parameters()}
    if {id(p) for p in adapter + lora} != trainable:
        raise RuntimeError(
            "optimizer groups do not match the trainable parameters (vision backbone not frozen?)"
        )
    groups = [{"params": adapter, "lr": recipe.lr_adapter, "name": "adapter"}]
    if lora:
        groups.append({"params": lora, "lr": recipe.lr_lora, "name": "lora"})
    return groups


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, procs: int = 1) -> LambdaLR:
    """Linear warmup then cosine decay to 0, per group; LoRA's starts at ``lora.start_step``.

    Accelerate steps a prepared scheduler once per process, so the schedule counts in those steps.
    """

    def schedule(start: int):
        start, warmup, end = start * procs, recipe.warmup_steps * procs, recipe.max_steps * procs

        def factor(t: int) -> float:
            if t < start:
                return 0.0
            t -= start
            if t < warmup:
                return (t + 1) / (warmup + 1)
            progress = (t - warmup) / max(1, end - start - warmup)
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

        return factor

    starts = {"adapter": 0, "lora": recipe.lora.start_step}
    return LambdaLR(optimizer, [schedule(starts[group["name"]]) for group in optimizer.param_groups])


def _check_output_dir(out: Path) -> None:
    if (out / ADAPTER_FILE).exists() or (out / LORA_DIR).exists():
        raise FileExistsError(
            f"output_dir {out} already holds a run; pass another output_dir=... (nothing was overwritten)"
        )


def _feature_source(recipe: Recipe) -> str:
    if not recipe.cache_features:
        return "computed every step"
    root = feature_cache_root(recipe.feature_cache_dir)
    where = f"disk cache under {root}" if root else "memory only"
    return f"computed once per image by the frozen backbone ({where})"


def _infinite(loader: DataLoader, set_epoch):
    epoch = 0
    while True:
        set_epoch(epoch)
        for batch in loader:
            yield epoch, batch
        epoch += 1


def train(recipe: Recipe) -> dict:
    """Train the recipe's model and write a run directory; returns the summary written to it."""
    out = Path(recipe.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=recipe.grad_accum_steps, mixed_precision=recipe.mixed_precision
    )
    main = accelerator.is_main_process
    if main:
        _check_output_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / RECIPE_FILE).write_text(recipe_to_yaml(recipe))
    accelerator.wait_for_everyone()
    _setup_logging(out, main)
    set_seed(recipe.seed)
    device = accelerator.device
    started = time.perf_counter()

    model = build_model(recipe, device)
    frozen_before = frozen_fingerprint(model)
    n_total, n_train = count_parameters(model), count_parameters(model, trainable_only=True)
    n_adapter = count_parameters(model.adapter, trainable_only=True)
    log.info(
        "trainable parameters: %d (adapter %d, LoRA %d) of %d total (%.2f%%)",
        n_train,
        n_adapter,
        n_train - n_adapter,
        n_total,
        100 * n_train / n_total,
    )

    data = recipe.data
    split = functools.partial(
        prepare_split,
        model,
        template=data.prompt_template,
        device=device,
        cache=recipe.cache_features,
        on_bad_sample=data.on_bad_sample,
        progress=main,
        cache_root=feature_cache_root(recipe.feature_cache_dir),
    )
    train_ds, train_feats, train_skipped = split(data.train, desc="encoding train images")
    eval_ds, eval_feats, _ = split(data.eval, limit=recipe.eval_limit, desc="encoding eval images")
    log.info(
        "data: %d train samples (%d skipped), %d eval samples; image features %s",
        len(train_ds),
        len(train_skipped),
        len(eval_ds),
        _feature_source(recipe),
    )
    if hasattr(model.adapter, "set_feature_stats"):
        model.adapter.set_feature_stats(*train_feats.stats())
    if len(train_ds) < recipe.batch_size:
        raise ValueError(f"batch_size={recipe.batch_size} exceeds the {len(train_ds)} training samples")

    collate = functools.partial(collate_train, pad_id=model.tokenizer.pad_token_id)
    lengths = [len(p) + len(t) for p, t in zip(train_ds.prompt_ids, train_ds.target_ids)]
    plain = LengthGroupedBatches(lengths, recipe.batch_size, 1, recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    sampler: LengthGroupedBatches | None = None
    if recipe.length_grouping > 1:
        sampler = LengthGroupedBatches(lengths, recipe.batch_size, recipe.length_grouping, recipe.seed)
        loader = DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate)
        log.info(
            "batches: %d per epoch, grouped by length in windows of %d: padding %.1f%% of text token "
            "slots (%.1f%% shuffled plainly)",
            len(sampler),
            recipe.length_grouping,
            100 * padding_fraction(lengths, sampler.batches(0)),
            100 * padding_fraction(lengths, plain.batches(0)),
        )
    else:  # a plain seeded shuffle (the order every run before length grouping existed used)
        loader = DataLoader(
            train_ds,
            batch_size=recipe.batch_size,
            shuffle=True,
            drop_last=True,
            generator=generator,
            collate_fn=collate,
        )
        log.info(
            "batches: %d per epoch, shuffled (padding about %.1f%% of text token slots; "
            "length_grouping=4 cuts it)",
            len(loader),
            100 * padding_fraction(lengths, plain.batches(0)),
        )
    groups = param_groups(model, recipe)
    optimizer = torch.optim.AdamW(groups, weight_decay=recipe.weight_decay)
    procs = accelerator.num_processes
    scheduler = build_scheduler(optimizer, recipe, procs)
    prepared, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    trainable = [p for group in groups for p in group["params"]]

    metrics_file = (out / "metrics.jsonl").open("w") if main else None
    samples_per_step = recipe.batch_size * recipe.grad_accum_steps * procs

    def record(obj: dict) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(obj) + "\n")
            metrics_file.flush()

    def run_eval(step: int) -> dict:
        metrics, _ = evaluate_vqa(
            accelerator.unwrap_model(prepared),
            eval_ds,
            eval_feats,
            recipe.eval_batch_size,
            recipe.max_new_tokens,
            progress=main,
        )
        prepared.train()
        log.info("step %d: eval accuracy %.4f on %d samples", step, metrics["accuracy"], metrics["n"])
        wall = round(time.perf_counter() - started, 2)
        record({"step": step, "wall_s": wall, **{f"eval_{k}": v for k, v in metrics.items()}})
        return metrics

    setup_peak_mb = peak_memory_mb(device)
    reset_peak_memory(device)
    prepared.train()
    step, window_loss, window_n, window_start = 0, 0.0, 0, time.perf_counter()
    train_start = time.perf_counter()

    def set_epoch(epoch: int) -> None:
        if sampler is not None:
            sampler.set_epoch(epoch)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        else:
            generator.manual_seed(recipe.seed + epoch)

    bar = tqdm(total=recipe.max_steps, desc="training", unit="step", disable=not main)
    for epoch, batch in _infinite(loader, set_epoch):
        model.lora_active = step >= recipe.lora.start_step
        with accelerator.accumulate(prepared):
            feats = train_feats.lookup(batch["image"])
            loss = prepared(feats, batch["input_ids"], batch["attention_mask"], batch["labels"])
            accelerator.backward(loss)
            if accelerator.sync_gradients and recipe.max_grad_norm > 0:
                accelerator.clip_grad_norm_(trainable, recipe.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        window_loss += loss.detach().float().item()
        window_n += 1
        if not accelerator.sync_gradients:
            continue
        step += 1
        bar.update()
        if step % recipe.log_every == 0 or step == recipe.max_steps:
            elapsed = time.perf_counter() - window_start
            steps_in_window = window_n / recipe.grad_accum_steps
            row = {
                "step": step,
                "epoch": epoch,
                "loss": round(window_loss / window_n, 6),
                "lr": optimizer.param_groups[0]["lr"],
                "lr_lora": optimizer.param_groups[-1]["lr"],
                "samples_per_s": round(steps_in_window * samples_per_step / elapsed, 3),
                "elapsed_s": round(time.perf_counter() - train_start, 2),
                "wall_s": round(time.perf_counter() - started, 2),
            }
            record(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", samples_s=f"{row['samples_per_s']:.1f}")
            log.info(
                "step %d loss %.4f lr %.2e samples/s %.1f", step, row["loss"], row["lr"], row["samples_per_s"]
            )
            window_loss, window_n, window_start = 0.0, 0, time.perf_counter()
        if recipe.eval_every and step % recipe.eval_every == 0 and step < recipe.max_steps:
            run_eval(step)
            window_start = time.perf_counter()  # samples/s counts training time only
        if step >= recipe.max_steps:
            break
    bar.close()
    train_seconds = time.perf_counter() - train_start

    model = accelerator.unwrap_model(prepared)
    if frozen_fingerprint(model) != frozen_before:
        raise RuntimeError("frozen backbone weights changed during training; this is a bug, please report it")
    eval_metrics = run_eval(step)
    summary = {
        "steps": step,
        "train_seconds": round(train_seconds, 2),
        "total_seconds": round(time.perf_counter() - started, 2),
        "train_samples": len(train_ds),
        "skipped_samples": len(train_skipped),
        "parameters": {
            "total": n_total,
            "trainable": n_train,
            "adapter": n_adapter,
            "lora": n_train - n_adapter,
        },
        "frozen_unchanged": True,
        "peak_memory_mb": {"setup": setup_peak_mb, "training": peak_memory_mb(device)},
        "eval": eval_metrics,
    }
    if main:
        model.save_trainables(out)
        write_json(out / ANSWERS_FILE, {"answers": answer_set([s.answer for s in train_ds.samples])})
        write_json(
            out / "eval.json", {"data": data.eval, "limit": recipe.eval_limit, "step": step, **eval_metrics}
        )
        write_json(out / "summary.json", summary)
        metrics_file.close()
        try:
            from adaptkit.plots import plot_run

            log.info("wrote %s", plot_run(out))
        except ImportError as err:  # the plot is a convenience; the run itself is complete
            log.warning("no curves.png: %s (pip install matplotlib)", err)
        log.info(
            "saved run to %s (%.0f s; peak memory %.0f MB in set-up, %.0f MB in training)",
            out,
            summary["total_seconds"],
            summary["peak_memory_mb"]["setup"],
            summary["peak_memory_mb"]["training"],
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary
