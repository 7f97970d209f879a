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
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from adaptkit import checkpoint as ckpt
from adaptkit.config import Recipe, recipe_to_yaml
from adaptkit.data.collate import collate_packed, collate_train, pack_runs
from adaptkit.data.feature_cache import FeatureCache, tensor_digest
from adaptkit.data.sampling import (
    ImagePackedBatches,
    LengthGroupedBatches,
    ProcessSplitBatches,
    padding_fraction,
)
from adaptkit.evaluation import evaluate_vqa
from adaptkit.inference import ANSWERS_FILE, answer_set
from adaptkit.model import (
    ADAPTER_FILE,
    LORA_DIR,
    add_answer_objective,
    build_model,
    count_parameters,
    frozen_fingerprint,
    prepare_for_training,
)
from adaptkit.perf import peak_memory_mb, reset_peak_memory
from adaptkit.runs import RECIPE_FILE, feature_cache_root, prepare_split, write_json

log = logging.getLogger("adaptkit")
SAMPLES_FILE = "samples.jsonl"


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
    if model.answer_head is not None:  # objectives.classify: trained with the adapter
        adapter += list(model.answer_head.parameters())
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


def build_optimizer(groups: list[dict], weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel over all parameters) where torch has a fused kernel for their device.

    On CPU the default per-parameter AdamW spends ~40 ms a step on the ~190 tensors of the default
    recipe; the fused kernel ~8 ms, with the same arithmetic (``tests/test_train.py``).
    """
    try:
        return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=True)
    except RuntimeError as err:  # parameters on a device without a fused kernel
        log.info("AdamW without the fused kernel (%s)", err)
        return torch.optim.AdamW(groups, weight_decay=weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, procs: int = 1) -> LambdaLR:
    """Linear warmup then cosine decay to 0, per group; LoRA's starts at ``lora.start_step``.

    Accelerate steps a prepared scheduler once per process at every optimizer step, so ``t // procs`` is
    the optimizer step and N processes follow exactly the one-process schedule.
    """

    def schedule(start: int):
        warmup, end = recipe.warmup_steps, recipe.max_steps

        def factor(t: int) -> float:
            t //= procs
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


def _packing_summary(
    sampler: ProcessSplitBatches, plain: LengthGroupedBatches, lengths: list[int], n_soft: int
) -> str:
    """LM token slots per question (soft tokens and padding included) with packing and without, for the
    rows each process packs from its slice of the global batches."""
    packer = sampler.inner

    def slots(rows: list[list[int]]) -> int:
        return len(rows) * (n_soft + max(sum(lengths[i] for i in row) for row in rows))

    packed = unpacked = questions = 0
    for batch in sampler.batches(0):
        runs = pack_runs([packer.image_rows[i] for i in batch], packer.pack)  # collate_packed's rows
        packed += slots([[batch[k] for k in run] for run in runs])
        questions += len(batch)
    for batch in plain.batches(0):
        unpacked += slots([[i] for i in batch])
    per_plain = unpacked / (len(plain) * plain.batch_size)
    return f"{packed / questions:.1f} LM token slots per question against {per_plain:.1f} unpacked"


def _feature_source(recipe: Recipe) -> str:
    if not recipe.cache_features:
        return "computed every step"
    root = feature_cache_root(recipe.feature_cache_dir)
    where = f"disk cache under {root}" if root else "memory only"
    return f"computed once per image by the frozen backbone ({where})"


def _infinite(loader: DataLoader, set_epoch, start_epoch: int = 0, skip: int = 0):
    """``(epoch, micro-batch index in the epoch, batch)`` forever; the first ``skip`` of ``start_epoch``
    are drawn and dropped, so a resumed run sees exactly the batches an uninterrupted one would."""
    epoch = start_epoch
    while True:
        set_epoch(epoch)
        for index, batch in enumerate(loader):
            if index >= skip:
                yield epoch, index, batch
        skip = 0
        epoch += 1


def _resume_point(recipe: Recipe, out: Path) -> Path | None:
    """The checkpoint ``recipe.resume`` asks for (None: start from scratch)."""
    if not recipe.resume:
        return None
    if recipe.resume == "auto":
        found = ckpt.latest_checkpoint(out)
        if found is None and (out / RECIPE_FILE).exists():
            stale = ckpt.checkpoint_root(out)
            raise FileExistsError(
                f"resume=auto: {out} holds a run but no complete checkpoint under {stale}; start a new "
                "output_dir (nothing was overwritten)"
            )
        return found
    path = Path(recipe.resume)
    folder = path if (path / ckpt.MANIFEST).is_file() else ckpt.latest_checkpoint(path)
    if folder is None:
        raise FileNotFoundError(f"resume={recipe.resume}: no complete checkpoint there")
    run = folder.parent.parent
    if run.resolve() != out.resolve():
        raise ValueError(
            f"resume={recipe.resume} belongs to run {run}, but output_dir is {out}; pass output_dir={run}"
        )
    return folder


def _flat(recipe: Recipe):
    """``(dotted key, value)`` for every recipe field."""
    from omegaconf import OmegaConf

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    return list(walk(OmegaConf.to_container(OmegaConf.structured(recipe))))


def _check_same_recipe(recipe: Recipe, out: Path) -> None:
    """A resumed run must train the recipe it was started with (only ``resume`` may differ)."""
    from adaptkit.config import load_recipe

    a, b = dict(_flat(load_recipe(out / RECIPE_FILE))), dict(_flat(recipe))
    differ = sorted(k for k in set(a) | set(b) if k != "resume" and a.get(k) != b.get(k))
    if differ:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in differ[:6])
        raise ValueError(
            f"resume: the recipe differs from {out / RECIPE_FILE} ({shown}); an exact resume needs the same "
            "recipe — drop those overrides or start a new output_dir"
        )


def _truncate_jsonl(path: Path, step: int) -> None:
    """Keep the lines of a metrics file up to ``step`` (a crashed run may have logged past its checkpoint)."""
    if not path.exists():
        return
    keep = [
        line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step
    ]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def train(recipe: Recipe) -> dict:
    """Train the recipe's model and write a run directory; returns the summary written to it."""
    out = Path(recipe.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=recipe.grad_accum_steps,
        mixed_precision=recipe.mixed_precision,
        log_with=None if recipe.report_to == "none" else recipe.report_to,
        project_dir=str(out),
        # LoRA's parameters take no gradient before lora.start_step: DDP must not wait for them.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"launched as {launched} processes but Accelerate set up {accelerator.num_processes}: each would "
            "train alone and write the same run. On CPU machines set ACCELERATE_USE_CPU=1 for the launch"
        )
    main = accelerator.is_main_process
    if accelerator.distributed_type.value == "FSDP":
        warnings.warn(
            "FSDP has not been run by adaptkit's tests (DDP has): checkpoints save each process's view of "
            "the trainable parameters; check a resumed run before relying on it",
            stacklevel=2,
        )
    resume_from = _resume_point(recipe, out)
    if resume_from is not None:
        _check_same_recipe(recipe, out)
        start_state = ckpt.load_state(resume_from)
        if start_state["step"] >= recipe.max_steps:
            raise FileExistsError(f"{out}: the run already finished ({resume_from.name}); nothing to resume")
    elif main:
        _check_output_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / RECIPE_FILE).write_text(recipe_to_yaml(recipe))
    accelerator.wait_for_everyone()
    _setup_logging(out, main)
    if resume_from is not None:
        log.info("resuming from %s (step %d)", resume_from, start_state["step"])
        if main:
            for stale in ckpt.clean_partial(out):
                log.info("removed %s, left by a crash during a checkpoint save", stale)
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
    root = feature_cache_root(recipe.feature_cache_dir)
    # Keyed once (weights digest + probe preprocessing) for both splits.
    disk_cache = (
        FeatureCache.for_backbone(root, model.vision, device) if root and recipe.cache_features else None
    )
    split = functools.partial(
        prepare_split,
        model,
        template=data.prompt_template,
        device=device,
        cache=recipe.cache_features,
        on_bad_sample=data.on_bad_sample,
        progress=main,
        cache_root=disk_cache,
        max_skip_ratio=data.max_skip_ratio,
    )
    train_ds, train_feats, train_skipped = split(data.train, desc="encoding train images")
    eval_ds, eval_feats, eval_skipped = split(data.eval, limit=recipe.eval_limit, desc="encoding eval images")
    log.info(
        "data: %d train samples (%d skipped), %d eval samples (%d skipped); image features %s",
        len(train_ds),
        len(train_skipped),
        len(eval_ds),
        len(eval_skipped),
        _feature_source(recipe),
    )
    if hasattr(model.adapter, "set_feature_stats"):
        model.adapter.set_feature_stats(*train_feats.stats())
    if recipe.objectives.classify > 0:
        vocab, labelled = add_answer_objective(model, train_ds, recipe.objectives)
        log.info(
            "objectives: %.3g x LM loss + %.3g x answer classification over %d answers (%d of %d samples "
            "labelled)",
            recipe.objectives.lm,
            recipe.objectives.classify,
            len(vocab),
            labelled,
            len(train_ds),
        )
    lower_states = prepare_for_training(model, recipe)
    procs = accelerator.num_processes
    # Grouped or packed batches are drawn at the global batch size (batch_size per process x processes)
    # and cut over the processes, so N processes train on one process's batches of N x batch_size.
    global_batch = recipe.batch_size * procs
    if len(train_ds) < global_batch:
        per = f" x {procs} processes" if procs > 1 else ""
        raise ValueError(
            f"batch_size={recipe.batch_size}{per} exceeds the {len(train_ds)} training samples: "
            "lower batch_size"
        )

    collate = functools.partial(collate_train, pad_id=model.tokenizer.pad_token_id)
    lengths = [len(p) + len(t) for p, t in zip(train_ds.prompt_ids, train_ds.target_ids)]
    plain = LengthGroupedBatches(lengths, recipe.batch_size, 1, recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    sampler: ProcessSplitBatches | None = None
    if recipe.pack_questions > 1:
        sampler = ProcessSplitBatches(
            ImagePackedBatches(
                train_ds.image_rows,
                global_batch,
                recipe.pack_questions,
                recipe.seed,
                lengths,
                recipe.length_grouping,
            ),
            procs,
        )
        collate = functools.partial(
            collate_packed, pad_id=model.tokenizer.pad_token_id, pack=recipe.pack_questions
        )
        loader = DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate)
        log.info(
            "batches: %d per epoch of %d questions, up to %d questions about one image per LM sequence "
            "(length_grouping=%d sorts the rows): %s",
            len(sampler.inner),
            global_batch,
            recipe.pack_questions,
            recipe.length_grouping,
            _packing_summary(sampler, plain, lengths, recipe.adapter.num_queries),
        )
    elif recipe.length_grouping > 1:
        grouped = LengthGroupedBatches(lengths, global_batch, recipe.length_grouping, recipe.seed)
        sampler = ProcessSplitBatches(grouped, procs)
        loader = DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate)
        log.info(
            "batches: %d per epoch, grouped by length in windows of %d: padding %.1f%% of text token "
            "slots (%.1f%% shuffled plainly)",
            len(grouped),
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
    optimizer = build_optimizer(groups, recipe.weight_decay)
    scheduler = build_scheduler(optimizer, recipe, procs)
    prepared, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    trainable = [p for group in groups for p in group["params"]]

    step, epoch_start, skip, window_loss, window_n = 0, 0, 0, 0.0, 0
    window_parts: dict[str, float] = {}  # the loss's parts over the logging window (logged when > 1 part)
    if resume_from is not None:
        unwrapped = accelerator.unwrap_model(prepared)
        ckpt.verify(resume_from)
        ckpt.load_trainables(resume_from, dict(unwrapped.trainable_parameters()))
        ckpt.load_optimizer(resume_from, optimizer)
        ckpt.load_scheduler(resume_from, scheduler)
        ckpt.load_rng(resume_from, accelerator.process_index, generator)
        step, epoch_start, skip = start_state["step"], start_state["epoch"], start_state["batch_in_epoch"]
        window_loss, window_n = start_state["window_loss"], start_state["window_n"]
        window_parts = dict(start_state.get("window_parts", {}))
        accelerator.step = start_state["accumulation_counter"]
        if main:
            _truncate_jsonl(out / "metrics.jsonl", step)
            _truncate_jsonl(out / SAMPLES_FILE, step)
    mode = "a" if resume_from is not None else "w"
    metrics_file = (out / "metrics.jsonl").open(mode) if main else None
    samples_file = (out / SAMPLES_FILE).open(mode) if main and recipe.log_samples else None
    samples_per_step = recipe.batch_size * recipe.grad_accum_steps * procs

    if recipe.report_to != "none":
        hparams = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in _flat(recipe)}
        accelerator.init_trackers("tensorboard", config=hparams)

    def record(obj: dict) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(obj) + "\n")
            metrics_file.flush()
        if recipe.report_to != "none":
            scalars = {k: v for k, v in obj.items() if k != "step" and isinstance(v, int | float)}
            accelerator.log(scalars, step=obj["step"])

    if resume_from is None:
        record(
            {
                "step": 0,
                "skipped_train": len(train_skipped),
                "skipped_eval": len(eval_skipped),
            }
        )

    def save_checkpoint(epoch: int, batch_in_epoch: int) -> None:
        """Every process writes its RNG states; the main process the rest; then one atomic rename."""
        folder = ckpt.staging_dir(out, step)
        if main:
            ckpt.begin(folder)
        accelerator.wait_for_everyone()
        ckpt.write_rng(folder, accelerator.process_index, generator)
        accelerator.wait_for_everyone()
        if main:
            state = {
                "step": step,
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "accumulation_counter": accelerator.step,
                "window_loss": window_loss,
                "window_n": window_n,
                "window_parts": window_parts,
                "processes": procs,
            }
            unwrapped = accelerator.unwrap_model(prepared)
            ckpt.write_main(folder, dict(unwrapped.trainable_parameters()), optimizer, scheduler, state)
            final = ckpt.commit(folder, recipe.keep_checkpoints)
            log.info("checkpoint %s", final)
        accelerator.wait_for_everyone()

    def run_eval(step: int) -> dict:
        with torch.compiler.set_stance("force_eager"):  # compiled LM layers are for the training step
            metrics, _ = evaluate_vqa(
                accelerator.unwrap_model(prepared),
                eval_ds,
                eval_feats,
                recipe.eval_batch_size,
                recipe.max_new_tokens,
                progress=main,
                accelerator=accelerator,
            )
        prepared.train()
        log.info("step %d: eval accuracy %.4f on %d samples", step, metrics["accuracy"], metrics["n"])
        wall = round(time.perf_counter() - started, 2)
        record({"step": step, "wall_s": wall, **{f"eval_{k}": v for k, v in metrics.items()}})
        return metrics

    def check_replicas(step: int) -> None:
        """Every process hashes its trainable weights; all digests must agree (DDP keeps replicas equal)."""
        from accelerate.utils import gather_object

        unwrapped = accelerator.unwrap_model(prepared)
        digests = gather_object([tensor_digest(unwrapped.trainable_parameters())])
        record({"step": step, "replica_digests": digests})
        if len(set(digests)) != 1:
            raise RuntimeError(f"step {step}: the {procs} processes hold different weights ({digests})")

    setup_peak_mb = peak_memory_mb(device)
    reset_peak_memory(device)
    prepared.train()
    window_start = time.perf_counter()
    train_start = time.perf_counter()

    def set_epoch(epoch: int) -> None:
        # The order of an epoch depends on (seed, epoch) alone, so a resumed run can replay it.
        generator.manual_seed(recipe.seed + epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)

    bar = tqdm(total=recipe.max_steps, initial=step, desc="training", unit="step", disable=not main)
    for epoch, index, batch in _infinite(loader, set_epoch, epoch_start, skip):
        model.lora_active = step >= recipe.lora.start_step
        with accelerator.accumulate(prepared):
            feats = train_feats.lookup(batch["image"])
            loss = prepared(
                feats,
                batch["input_ids"],
                batch["attention_mask"],
                batch["labels"],
                batch.get("answer_class"),
                segment_ids=batch.get("segment_ids"),
                positions=batch.get("positions"),
            )
            accelerator.backward(loss)
            if accelerator.sync_gradients and recipe.max_grad_norm > 0:
                accelerator.clip_grad_norm_(trainable, recipe.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        micro_loss = loss.detach().float().item()
        window_loss += micro_loss
        window_n += 1
        for name, part in accelerator.unwrap_model(prepared).loss_parts.items():
            window_parts[name] = window_parts.get(name, 0.0) + part.float().item()
        if recipe.log_samples:  # every process joins the gather; the main one writes
            seen = accelerator.gather(batch["index"].to(accelerator.device)).tolist()
            if samples_file is not None:
                row = {"step": step + 1, "epoch": epoch, "indices": seen, "loss": micro_loss}
                samples_file.write(json.dumps(row) + "\n")
                samples_file.flush()
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
                **{
                    f"loss_{k}": round(v / window_n, 6)
                    for k, v in window_parts.items()
                    if len(window_parts) > 1
                },
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
            window_parts = {}
        if recipe.check_replicas and step % recipe.check_replicas == 0:
            check_replicas(step)
        if recipe.eval_every and step % recipe.eval_every == 0 and step < recipe.max_steps:
            run_eval(step)
            window_start = time.perf_counter()  # samples/s counts training time only
        if step >= recipe.max_steps or (recipe.checkpoint_every and step % recipe.checkpoint_every == 0):
            save_checkpoint(epoch, index + 1)
            window_start = time.perf_counter()
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
        "skipped": {"train": train_skipped[:100], "eval": eval_skipped[:100]},
        "parameters": {
            "total": n_total,
            "trainable": n_train,
            "adapter": n_adapter,
            "lora": n_train - n_adapter,
        },
        "frozen_unchanged": True,
        "resumed_from": str(resume_from) if resume_from is not None else None,
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
        if samples_file is not None:
            samples_file.close()
        try:
            from adaptkit.plots import plot_run

            log.info("wrote %s", plot_run(out))
        except ImportError as err:  # the plot is a convenience; the run itself is complete
            log.warning("no curves.png: %s (pip install matplotlib)", err)
        if lower_states is not None:
            log.info(
                "lower-layer states: %d texts kept (%.1f MB); %d looked up, %d computed",
                len(lower_states.store),
                lower_states.bytes / 2**20,
                lower_states.hits + lower_states.misses,
                lower_states.misses,
            )
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
