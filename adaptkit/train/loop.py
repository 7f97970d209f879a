"""The training loop on HF Accelerate: CPU, one GPU, or many through ``accelerate launch``.

``train(recipe)`` = :func:`adaptkit.train.setup.setup` (everything before the first step), the loop below
(a step, then logging, evaluation and checkpoints on their schedules, with a tqdm bar), and the summary.
Freezing is asserted, not assumed: the optimizer holds exactly the trainable parameters
(``optim.param_groups``) and the frozen weights' digest must be unchanged at the end.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from adaptkit import checkpoint as ckpt
from adaptkit.artifacts import seal_run, write_json
from adaptkit.data.feature_cache import tensor_digest
from adaptkit.data.pixels import step_features
from adaptkit.model.build import frozen_fingerprint
from adaptkit.model.trainables import save_trainables
from adaptkit.objectives import IGNORE
from adaptkit.perf import peak_memory_mb, reset_peak_memory
from adaptkit.train.setup import TrainingRun, setup

if TYPE_CHECKING:
    from adaptkit.config import Recipe

log = logging.getLogger("adaptkit")


def _batches(run: TrainingRun):
    """``(epoch, micro-batch index in the epoch, batch)`` forever; a resumed run first draws and drops the
    micro-batches its checkpoint had consumed, so it sees exactly the batches an uninterrupted one would.
    An epoch's order depends on ``(seed, epoch)`` alone."""
    epoch, skip = run.epoch, run.skip
    while True:
        run.generator.manual_seed(run.recipe.seed + epoch)
        if run.sampler is not None:
            run.sampler.set_epoch(epoch)
        if hasattr(run.loader, "set_epoch"):
            run.loader.set_epoch(epoch)
        if run.tagged is not None:  # workers prepare images for the micro-batches the loop uses
            run.tagged.set_epoch(epoch)
            run.tagged.skip = skip
        for index, batch in enumerate(run.loader):
            if index >= skip:
                yield epoch, index, batch
        skip = 0
        epoch += 1


#: a collated batch's tensors with one row per LM sequence (``index`` has one per question when packed).
ROW_KEYS = ("image", "input_ids", "attention_mask", "labels", "segment_ids", "positions", "answer_class")


def token_chunks(batch: dict, max_tokens: int) -> list[tuple[slice, dict, float]]:
    """``batch`` cut into consecutive row slices of at most ``max_tokens`` LM text slots each (rows x
    longest row; each slice trimmed to its own longest row), with the share of the batch's target tokens
    in each: the LM loss is a mean over target tokens, so the slices' losses weighted by those shares sum
    to the whole batch's. Returns ``(rows, slice's batch, weight)``; the whole batch, weight 1, when it
    fits (or ``max_tokens`` is 0)."""
    if not max_tokens or "labels" not in batch:  # no LM text (retrieval's batches): nothing to cut
        return [(slice(0, None), batch, 1.0)]
    rows, width = batch["input_ids"].shape
    if rows * width <= max_tokens or rows == 1:
        return [(slice(0, rows), batch, 1.0)]
    per = max(1, max_tokens // width)  # rows of the longest length fit: a conservative, fixed cut
    targets = int((batch["labels"] != IGNORE).sum())
    chunks = []
    for start in range(0, rows, per):
        part = {k: batch[k][start : start + per] for k in ROW_KEYS if k in batch}
        used = int(part["attention_mask"].sum(-1).max())
        for k in ("input_ids", "attention_mask", "labels", "segment_ids", "positions"):
            if k in part:
                part[k] = part[k][:, :used]
        weight = int((part["labels"] != IGNORE).sum()) / max(targets, 1)
        chunks.append((slice(start, start + per), part, weight))
    return chunks


def train_step(run: TrainingRun, batch: dict) -> float:
    """One micro-batch: the task's loss, backward, and (at an accumulation boundary) clip, AdamW step and
    schedule. A batch over ``max_batch_tokens`` (with the LM loss alone) runs as several slices whose
    weighted gradients add up to the batch's (:func:`token_chunks`). Returns the micro-batch's loss."""
    recipe, accelerator = run.recipe, run.accelerator
    run.model.lora_active = run.step >= recipe.lora.start_step
    with accelerator.accumulate(run.prepared):
        feats = step_features(run, batch)  # the step picks augmented views
        chunks = token_chunks(batch, run.token_budget)
        loss, run.step_parts = 0.0, {}
        for n, (rows, part, weight) in enumerate(chunks):
            last = n == len(chunks) - 1  # gradients of the earlier slices wait for the last one's sync
            with contextlib.nullcontext() if last else accelerator.no_sync(run.prepared):
                part_loss = run.task.loss(run.prepared, feats[rows], part) * weight
                accelerator.backward(part_loss)
            loss = loss + part_loss.detach()
            for name, value in run.unwrapped().loss_parts.items():  # each objective, weighted alike
                run.step_parts[name] = run.step_parts.get(name, 0.0) + value * weight
        if accelerator.sync_gradients and recipe.max_grad_norm > 0:
            accelerator.clip_grad_norm_(run.trainable, recipe.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return float(loss)


def evaluate(run: TrainingRun) -> dict:
    """The task's metrics on the eval split (sharded over processes), recorded at the current step."""
    with torch.compiler.set_stance("force_eager"):  # compiled LM layers are for the training step
        metrics, _ = run.task.evaluate(
            run.unwrapped(),
            run.eval.dataset,
            run.eval.features,
            run.recipe.eval_batch_size,
            progress=run.main,
            accelerator=run.accelerator,
        )
    run.prepared.train()
    headline = run.task.headline_metric
    log.info("step %d: eval %s %.4f on %d samples", run.step, headline, metrics[headline], metrics["n"])
    wall = round(time.perf_counter() - run.started, 2)
    run.records.record({"step": run.step, "wall_s": wall, **{f"eval_{k}": v for k, v in metrics.items()}})
    return metrics


def save_checkpoint(run: TrainingRun, epoch: int, batch_in_epoch: int) -> None:
    """Every process writes its RNG states; the main process the rest; then one atomic rename. A failed
    write (a full disk) removes the partial folder and stops the run, the earlier checkpoints intact."""
    try:
        _write_checkpoint(run, epoch, batch_in_epoch)
    except OSError as err:
        folder = ckpt.staging_dir(run.out, run.step)
        shutil.rmtree(folder, ignore_errors=True)
        kept = ckpt.latest_checkpoint(run.out)
        intact = f"{kept.name} is intact" if kept else "no earlier checkpoint exists"
        raise ckpt.CheckpointError(
            f"could not write the checkpoint of step {run.step} under {folder.parent} "
            f"({err.strerror or err}); nothing partial was left and {intact}: free space, then continue with "
            "resume=auto"
        ) from None


def _write_checkpoint(run: TrainingRun, epoch: int, batch_in_epoch: int) -> None:
    accelerator = run.accelerator
    folder = ckpt.staging_dir(run.out, run.step)
    if run.main:
        ckpt.begin(folder)
    accelerator.wait_for_everyone()
    ckpt.write_rng(folder, accelerator.process_index, run.generator)
    accelerator.wait_for_everyone()
    if run.main:
        state = {
            "step": run.step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "accumulation_counter": accelerator.step,
            **run.window.state(),
            "processes": run.procs,
        }
        trainables = dict(run.unwrapped().trainable_parameters())
        ckpt.write_main(folder, trainables, run.optimizer, run.scheduler, state)
        log.info("checkpoint %s", ckpt.commit(folder, run.recipe.keep_checkpoints))
    accelerator.wait_for_everyone()


def check_replicas(run: TrainingRun) -> None:
    """Every process hashes its trainable weights; all digests must agree (DDP keeps replicas equal)."""
    from accelerate.utils import gather_object

    digests = gather_object([tensor_digest(run.unwrapped().trainable_parameters())])
    run.records.record({"step": run.step, "replica_digests": digests})
    if len(set(digests)) != 1:
        raise RuntimeError(f"step {run.step}: the {run.procs} processes hold different weights ({digests})")


def _log_step(run: TrainingRun, epoch: int, train_start: float, bar) -> None:
    recipe = run.recipe
    per_step = recipe.batch_size * recipe.grad_accum_steps * run.procs
    row = run.window.row(run.step, epoch, run.optimizer, per_step, recipe.grad_accum_steps)
    row["elapsed_s"] = round(time.perf_counter() - train_start, 2)
    row["wall_s"] = round(time.perf_counter() - run.started, 2)
    run.records.record(row)
    bar.set_postfix(loss=f"{row['loss']:.4f}", samples_s=f"{row['samples_per_s']:.1f}")
    log.info(
        "step %d loss %.4f lr %.2e samples/s %.1f", run.step, row["loss"], row["lr"], row["samples_per_s"]
    )


def run_loop(run: TrainingRun) -> float:
    """Train until ``max_steps``; returns the seconds spent in the loop."""
    recipe, accelerator = run.recipe, run.accelerator
    run.prepared.train()
    run.window.restart()
    train_start = time.perf_counter()
    bar = tqdm(total=recipe.max_steps, initial=run.step, desc="training", unit="step", disable=not run.main)
    for epoch, index, batch in _batches(run):
        loss = train_step(run, batch)
        run.window.add(loss, run.step_parts)
        if recipe.log_samples:  # every process joins the gather; the main one writes
            seen = accelerator.gather(batch["index"].to(accelerator.device)).tolist()
            run.records.sample_row({"step": run.step + 1, "epoch": epoch, "indices": seen, "loss": loss})
        if not accelerator.sync_gradients:
            continue
        run.step += 1
        bar.update()
        if run.step % recipe.log_every == 0 or run.step == recipe.max_steps:
            _log_step(run, epoch, train_start, bar)
        if recipe.check_replicas and run.step % recipe.check_replicas == 0:
            check_replicas(run)
        if recipe.eval_every and run.step % recipe.eval_every == 0 and run.step < recipe.max_steps:
            evaluate(run)
            run.window.restart()  # samples/s counts training time only
        last = run.step >= recipe.max_steps
        if last or (recipe.checkpoint_every and run.step % recipe.checkpoint_every == 0):
            save_checkpoint(run, epoch, index + 1)
            run.window.restart()
        if last:
            break
    bar.close()
    return time.perf_counter() - train_start


def finish(run: TrainingRun, train_seconds: float, setup_peak_mb: float) -> dict:
    """Check the frozen weights, evaluate, and (main process) save the trainables, the task's run files,
    ``eval.json``, ``summary.json``, ``curves.png`` and, last, the run's manifest; returns the summary."""
    recipe, model = run.recipe, run.unwrapped()
    if frozen_fingerprint(model) != run.frozen_before:
        raise RuntimeError("frozen backbone weights changed during training; this is a bug, please report it")
    eval_metrics = evaluate(run)
    summary = {
        "steps": run.step,
        "train_seconds": round(train_seconds, 2),
        "total_seconds": round(time.perf_counter() - run.started, 2),
        "train_samples": len(run.train.dataset),
        "skipped_samples": len(run.train.skipped),
        "skipped": {"train": run.train.skipped[:100], "eval": run.eval.skipped[:100]},
        "parameters": run.parameters,
        "frozen_unchanged": True,
        "resumed_from": str(run.resume_from) if run.resume_from is not None else None,
        "peak_memory_mb": {"setup": setup_peak_mb, "training": peak_memory_mb(run.accelerator.device)},
        "eval": eval_metrics,
    }
    if run.main:
        out = run.out
        save_trainables(model, out)
        run.task.save_run_files(out, run.train.dataset)
        eval_row = {"data": recipe.data.eval, "limit": recipe.eval_limit, "step": run.step, **eval_metrics}
        write_json(out / "eval.json", eval_row)
        write_json(out / "summary.json", summary)
        run.records.close()
        _finish_log(run, summary)
        seal_run(out)  # last: the run directory is complete and every model file is hashed
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return summary


def _finish_log(run: TrainingRun, summary: dict) -> None:
    try:
        from adaptkit.plots import plot_run

        log.info("wrote %s", plot_run(run.out))
    except ImportError as err:  # the plot is a convenience; the run itself is complete
        log.warning("no curves.png: %s (pip install matplotlib)", err)
    cache = run.lower_states
    if cache is not None:
        log.info(
            "lower-layer states: %d texts kept (%.1f MB); %d looked up, %d computed",
            len(cache.store),
            cache.bytes / 2**20,
            cache.hits + cache.misses,
            cache.misses,
        )
    peak = summary["peak_memory_mb"]
    log.info(
        "saved run to %s (%.0f s; peak memory %.0f MB in set-up, %.0f MB in training)",
        run.out,
        summary["total_seconds"],
        peak["setup"],
        peak["training"],
    )


def train(recipe: Recipe) -> dict:
    """Train the recipe's model and write a run directory; returns the summary written to it."""
    run = setup(recipe)
    device = run.accelerator.device
    setup_peak_mb = peak_memory_mb(device)
    reset_peak_memory(device)
    seconds = run_loop(run)
    return finish(run, seconds, setup_peak_mb)
