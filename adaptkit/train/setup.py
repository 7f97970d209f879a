"""Everything `adaptkit train` does before its first step, in order (the order fixes the random streams,
so a run is reproducible and a resumed run continues exactly):

1. Accelerate (processes, devices, mixed precision, trackers) and its sanity checks;
2. the run directory: a new one (never overwriting a run) or the checkpoint to resume from; the log;
3. the model (frozen backbones, fresh adapter, LoRA) and the frozen weights' digest;
4. the data: the task's datasets over frozen features (encoded once, cached on disk), the adapter's
   feature statistics, the task's objectives, the lower-state cache and compiled layers;
5. batches (plain shuffle, length-grouped, or packed by image; split over processes);
6. AdamW and its schedule, prepared by Accelerate; on resume, the checkpoint's state.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from adaptkit import checkpoint as ckpt
from adaptkit.artifacts import RECIPE_FILE
from adaptkit.config import recipe_to_yaml
from adaptkit.data.collate import pack_runs
from adaptkit.data.feature_cache import FeatureCache
from adaptkit.data.pixels import OnTheFlyFeatures, StepTaggedBatches, reads_ahead, step_loader
from adaptkit.data.sampling import LengthGroupedBatches, ProcessSplitBatches, epoch_batches, padding_fraction
from adaptkit.data.splits import encode_shown_views, feature_cache_root, prepare_split
from adaptkit.model.build import build_model, count_parameters, frozen_fingerprint, prepare_for_training
from adaptkit.tasks import get_task
from adaptkit.train.init_from import check_init_source, init_from_run
from adaptkit.train.optim import build_optimizer, build_scheduler, param_groups
from adaptkit.train.records import Records, Window, setup_logging
from adaptkit.train.resume import check_output_dir, check_same_recipe, resume_point

if TYPE_CHECKING:
    from adaptkit.config import Recipe

log = logging.getLogger("adaptkit")


@dataclass
class Split:
    """A prepared data split: the task's dataset, its image features and the samples dropped."""

    dataset: object
    features: object
    skipped: list[str]


@dataclass
class TrainingRun:
    """The state a training run carries from set-up through the loop to its summary."""

    recipe: Recipe
    out: Path
    accelerator: Accelerator
    task: object
    model: torch.nn.Module
    train: Split
    eval: Split
    started: float
    frozen_before: str = ""
    parameters: dict = field(default_factory=dict)
    lower_states: object = None
    #: ``max_batch_tokens`` where it applies (the LM loss alone; 0: batches run whole).
    token_budget: int = 0
    #: each objective's value in the last micro-batch (its slices' values weighted as the loss is).
    step_parts: dict = field(default_factory=dict)
    loader: DataLoader | None = None
    sampler: ProcessSplitBatches | None = None
    #: where workers prepare each batch's images (pixels.py): its batches, tagged with the step each trains at
    tagged: StepTaggedBatches | None = None
    generator: torch.Generator | None = None
    prepared: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object = None
    trainable: list = field(default_factory=list)
    records: Records | None = None
    window: Window = field(default_factory=Window)
    resume_from: Path | None = None
    step: int = 0
    epoch: int = 0
    skip: int = 0

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def procs(self) -> int:
        return self.accelerator.num_processes

    def unwrapped(self):
        return self.accelerator.unwrap_model(self.prepared)


def start_accelerator(recipe: Recipe) -> Accelerator:
    """Accelerate for this launch; refuses a launch it did not set up as distributed (N lone copies)."""
    accelerator = Accelerator(
        gradient_accumulation_steps=recipe.grad_accum_steps,
        mixed_precision=recipe.mixed_precision,
        log_with=None if recipe.report_to == "none" else recipe.report_to,
        project_dir=recipe.output_dir,
        # LoRA's parameters take no gradient before lora.start_step: DDP must not wait for them.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"launched as {launched} processes but Accelerate set up {accelerator.num_processes}: each would "
            "train alone and write the same run. On CPU machines set ACCELERATE_USE_CPU=1 for the launch"
        )
    if accelerator.distributed_type.value == "DEEPSPEED":
        # adaptkit's batches come from a batch sampler; DeepSpeed's "auto" micro-batch cannot be read from it.
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds_config["train_micro_batch_size_per_gpu"] = recipe.batch_size
        warnings.warn(
            "DeepSpeed has not been run by adaptkit's tests (DDP has): check a resumed run before relying "
            "on it",
            stacklevel=3,
        )
    if accelerator.distributed_type.value == "FSDP":
        warnings.warn(
            "FSDP has not been run by adaptkit's tests (DDP has): checkpoints save each process's view of "
            "the trainable parameters; check a resumed run before relying on it",
            stacklevel=3,
        )
    return accelerator


def open_run_dir(recipe: Recipe, accelerator: Accelerator) -> tuple[Path | None, dict | None]:
    """A new run directory with its ``recipe.yaml``, or the checkpoint to resume (and its loop state)."""
    out = Path(recipe.output_dir)
    main = accelerator.is_main_process
    resume_from, start_state = resume_point(recipe, out), None
    if resume_from is not None:
        check_same_recipe(recipe, out)
        ckpt.verify(resume_from)  # its files are the ones the checkpoint wrote
        start_state = ckpt.load_state(resume_from)
        if start_state["step"] >= recipe.max_steps:
            raise FileExistsError(f"{out}: the run already finished ({resume_from.name}); nothing to resume")
    elif main:
        check_output_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / RECIPE_FILE).write_text(recipe_to_yaml(recipe))
    accelerator.wait_for_everyone()
    setup_logging(out, main)
    if resume_from is not None:
        log.info("resuming from %s (step %d)", resume_from, start_state["step"])
        if main:
            for stale in ckpt.clean_partial(out):
                log.info("removed %s, left by a crash during a checkpoint save", stale)
    return resume_from, start_state


def _log_parameters(model) -> dict:
    n_total, n_train = count_parameters(model), count_parameters(model, trainable_only=True)
    n_adapter = count_parameters(model.adapter, trainable_only=True)
    n_lora = count_parameters(model.lm, trainable_only=True)
    text = model.text_encoder
    n_text = count_parameters(text, trainable_only=True) if text is not None else 0
    n_heads = n_train - n_adapter - n_lora - n_text  # the image-text heads (a task's own come later)
    log.info(
        "trainable parameters: %d (adapter %d, LoRA %d, heads %d, text-encoder LoRA %d) of %d total (%.2f%%)",
        n_train,
        n_adapter,
        n_lora,
        n_heads,
        n_text,
        n_total,
        100 * n_train / n_total,
    )
    return {
        "total": n_total,
        "trainable": n_train,
        "adapter": n_adapter,
        "lora": n_lora,
        "heads": n_heads,
        "text_lora": n_text,
    }


def _feature_source(recipe: Recipe) -> str:
    if not recipe.cache_features:
        return "computed every step"
    root = feature_cache_root(recipe.feature_cache_dir)
    where = f"disk cache under {root}" if root else "memory only"
    return f"computed once per image by the frozen backbone ({where})"


def prepare_data(recipe: Recipe, task, model, device, main: bool) -> tuple[Split, Split]:
    """The task's training and eval splits over frozen features (each image encoded once)."""
    data = recipe.data
    root = feature_cache_root(recipe.feature_cache_dir)
    # Keyed once (weights digest + probe preprocessing) for both splits.
    disk_cache = (
        FeatureCache.for_backbone(root, model.vision, device, model.feature_dtype)
        if root and recipe.cache_features
        else None
    )
    split = functools.partial(
        prepare_split,
        task,
        model,
        device=device,
        cache=recipe.cache_features,
        on_bad_sample=data.on_bad_sample,
        progress=main,
        cache_root=disk_cache,
        max_skip_ratio=data.max_skip_ratio,
    )
    augment = data.train_augment()
    if data.augment.views and augment is None:
        log.info(
            "data.augment: views off: data.augment.only_for=%r does not cover data.train=%r (its transforms "
            "were chosen for that data; set data.augment.only_for='' to use them on this data)",
            data.augment.only_for,
            data.train,
        )
    train = Split(
        *split(
            data.train,
            desc="encoding train images",
            augment=augment,
            seed=recipe.seed,
            defer_views=True,  # encoded once the batches are known: those the run's steps show
        )
    )
    evals = Split(*split(data.eval, limit=recipe.eval_limit, desc="encoding eval images"))
    log.info(
        "data: %d train samples (%d skipped), %d eval samples (%d skipped); image features %s",
        len(train.dataset),
        len(train.skipped),
        len(evals.dataset),
        len(evals.skipped),
        _feature_source(recipe),
    )
    return train, evals


def _packing_summary(sampler: ProcessSplitBatches, plain: LengthGroupedBatches, lengths, n_soft) -> str:
    """LM token slots per question (soft tokens and padding included) with packing and without, for the
    rows each process packs from its slice of the global batches."""
    packer = sampler.inner

    def slots(rows: list[list[int]]) -> int:
        return len(rows) * (n_soft + max(sum(lengths[i] for i in row) for row in rows))

    packed = unpacked = questions = 0
    for batch in sampler.batches(0):
        runs = pack_runs(  # collate_packed's rows
            [packer.image_rows[i] for i in batch], packer.pack, [lengths[i] for i in batch], packer.max_tokens
        )
        packed += slots([[batch[k] for k in run] for run in runs])
        questions += len(batch)
    for batch in plain.batches(0):
        unpacked += slots([[i] for i in batch])
    per_plain = unpacked / (len(plain) * plain.batch_size)
    return f"{packed / questions:.1f} LM token slots per question against {per_plain:.1f} unpacked"


def build_loader(run: TrainingRun) -> None:
    """The training batches: a seeded shuffle, length-grouped, or packed by image; with N processes the
    sampler draws the global batches (batch_size x N) and each process trains on its slice."""
    recipe, dataset, procs = run.recipe, run.train.dataset, run.procs
    global_batch = recipe.batch_size * procs
    if len(dataset) < global_batch:
        per = f" x {procs} processes" if procs > 1 else ""
        raise ValueError(
            f"batch_size={recipe.batch_size}{per} exceeds the {len(dataset)} training samples: "
            "lower batch_size"
        )
    pad = run.model.tokenizer.pad_token_id
    lengths = run.task.lengths(dataset)
    plain = LengthGroupedBatches(lengths, recipe.batch_size, 1, recipe.seed)
    run.generator = torch.Generator().manual_seed(recipe.seed)
    pack = recipe.pack_questions
    collate = run.task.collate(pad, pack)
    inner = epoch_batches(recipe, dataset.image_rows, lengths, global_batch)
    if inner is not None:
        run.sampler = ProcessSplitBatches(inner, procs)
    if pack > 1:
        summary = _packing_summary(run.sampler, plain, lengths, run.model.adapter.num_tokens)
        what = (
            f"{len(inner)} per epoch of {global_batch} questions, up to {pack} questions about one image per "
            f"LM sequence (length_grouping={recipe.length_grouping} sorts the rows): {summary}"
        )
    elif inner is not None:
        what = (
            f"{len(inner)} per epoch, grouped by length in windows of {recipe.length_grouping}: padding "
            f"{100 * padding_fraction(lengths, run.sampler.batches(0)):.1f}% of text token slots "
            f"({100 * padding_fraction(lengths, plain.batches(0)):.1f}% shuffled plainly)"
        )
    if run.sampler is None:  # a plain seeded shuffle (the order every run before length grouping used)
        what = (
            f"{len(dataset) // recipe.batch_size} per epoch, shuffled (padding about "
            f"{100 * padding_fraction(lengths, plain.batches(0)):.1f}% of text token slots; "
            "length_grouping=4 cuts it)"
        )
    features, workers = run.train.features, recipe.image_workers
    on_the_fly = isinstance(features, OnTheFlyFeatures)
    if on_the_fly or reads_ahead(features, workers, run.accelerator.device):  # prepared in workers
        order = run.sampler
        if order is None:  # the plain shuffle, drawn as the DataLoader below draws it
            order = BatchSampler(RandomSampler(dataset, generator=run.generator), recipe.batch_size, True)
        run.tagged = StepTaggedBatches(order, procs, recipe.grad_accum_steps, recipe.max_steps)
        run.loader = step_loader(dataset, run.tagged, collate, features, workers, run.generator)
        done = "decoded, augmented and preprocessed" if on_the_fly else "their features read from the store"
        log.info("images: %s for each step in %d worker processes", done, workers)
    elif run.sampler is not None:
        run.loader = DataLoader(dataset, batch_sampler=run.sampler, collate_fn=collate)
    else:
        run.loader = DataLoader(
            dataset,
            batch_size=recipe.batch_size,
            shuffle=True,
            drop_last=True,
            generator=run.generator,
            collate_fn=collate,
        )
    log.info("batches: %s", what)


def restore(run: TrainingRun, state: dict) -> None:
    """Continue from ``run.resume_from``: weights, AdamW, schedule, RNG, data position, logging window."""
    folder = run.resume_from
    ckpt.verify(folder)
    ckpt.load_trainables(folder, dict(run.unwrapped().trainable_parameters()))
    ckpt.load_optimizer(folder, run.optimizer)
    ckpt.load_scheduler(folder, run.scheduler)
    ckpt.load_rng(folder, run.accelerator.process_index, run.generator)
    run.step, run.epoch, run.skip = state["step"], state["epoch"], state["batch_in_epoch"]
    run.window = Window(state["window_loss"], state["window_n"], state.get("window_parts", {}))
    run.accelerator.step = state["accumulation_counter"]


def setup(recipe: Recipe) -> TrainingRun:
    """Steps 1-6 of the module docstring; returns the run, ready for its first (or next) step."""
    accelerator = start_accelerator(recipe)
    if recipe.init_from:
        check_init_source(recipe, Path(recipe.init_from))
    resume_from, start_state = open_run_dir(recipe, accelerator)
    set_seed(recipe.seed)
    device, started = accelerator.device, time.perf_counter()
    task = get_task(recipe)
    model = build_model(recipe, device)
    frozen_before = frozen_fingerprint(model)
    parameters = _log_parameters(model)
    log.info("%s", model.fusion.paths())
    train, evals = prepare_data(recipe, task, model, device, accelerator.is_main_process)
    run = TrainingRun(recipe, Path(recipe.output_dir), accelerator, task, model, train, evals, started)
    run.frozen_before, run.parameters, run.resume_from = frozen_before, parameters, resume_from
    if recipe.init_from:
        init_from_run(model, recipe.init_from)
    else:
        model.adapter.set_feature_stats(*train.features.stats())
    objectives = task.setup_objectives(model, train.dataset)
    if len(model.objectives.active()) > 1:
        log.info("%s", objectives)
    if model.objectives.active() == ["lm"]:
        run.token_budget = recipe.max_batch_tokens
    elif recipe.max_batch_tokens:
        log.info(
            "max_batch_tokens=%d does not apply: objectives %s need whole batches",
            recipe.max_batch_tokens,
            ", ".join(model.objectives.active()),
        )
    lookups = recipe.max_steps * recipe.batch_size * recipe.grad_accum_steps * run.procs
    texts = task.texts(train.dataset) if model.entry_layer else None
    run.lower_states = prepare_for_training(model, recipe, texts, lookups)
    build_loader(run)
    encode_shown_views(train.features, run.sampler, train.dataset, recipe)
    groups = param_groups(model, recipe)
    optimizer = build_optimizer(groups, recipe.weight_decay)
    scheduler = build_scheduler(optimizer, recipe, run.procs)
    run.prepared, run.optimizer, run.loader, run.scheduler = accelerator.prepare(
        model, optimizer, run.loader, scheduler
    )
    run.trainable = [p for group in groups for p in group["params"]]
    if resume_from is not None:
        restore(run, start_state)
    run.records = Records(accelerator, recipe, run.out, run.step if resume_from is not None else None)
    if resume_from is None:
        run.records.record(
            {"step": 0, "skipped_train": len(train.skipped), "skipped_eval": len(evals.skipped)}
        )
    return run
