"""Each micro-batch's images prepared in DataLoader workers, ahead of its step: decoded, augmented and
preprocessed when features are computed every step (``cache_features: false``), or their stored features
read from the feature store.

Where there is no room for a feature store, each step needs its images' pixels. Decoding, the augmented
view and the backbone's preprocessing (resize, scale) are per-image Python and PIL work, so they run in
``image_workers`` DataLoader worker processes, batches ahead of the step that needs them; the backbone
itself runs in the training process, on the training device (a worker cannot share a GPU, and on CPU the
step's own threads do the matrix work). With a store, the workers read each batch's rows from the disk
(or from CPU memory) the same way, so a step does not wait on the disk. A feature source has ``load``
(what a worker makes: :meth:`OnTheFlyFeatures.pixels`, or a bank's stored rows), ``finish`` (what the step
does with it: encode, or convert to float32 on the device) and ``lookup`` (both at once, for evaluation
and the adapter's feature statistics).

A worker must know the step a batch will be trained at before the loop gets there: the step picks each
image's augmented view (:func:`~adaptkit.data.augment.view_choice`). ``StepTaggedBatches`` tags every
index of a micro-batch with that step, from Accelerate's accumulation rule (an optimizer step after every
``grad_accum_steps`` micro-batches and at each epoch's end, as :func:`~adaptkit.data.sampling.shown_views`
replays it), and whether the loop will use the batch at all (a resumed run draws and drops the
micro-batches its checkpoint had consumed: those are not prepared). ``TaggedDataset`` and ``StepCollate``
turn tagged indices into the task's batch plus ``loaded`` and ``step``; the loop checks ``step`` against
its own count, so a schedule out of step fails loudly instead of training on other views.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from adaptkit.backbones.vision import VisionBackbone
from adaptkit.data.augment import make_view, view_choice
from adaptkit.data.feature_cache import file_key
from adaptkit.data.formats import DataError
from adaptkit.data.images import open_image

if TYPE_CHECKING:
    from adaptkit.config import AugmentConfig
    from adaptkit.data.colour_names import Colour

log = logging.getLogger(__name__)


class _Probe(Dataset):
    """Decodes each image once (and hashes it where views need its key): ``(path, error, key)``."""

    def __init__(self, paths: list[str], origins: dict[str, str], keys: bool) -> None:
        self.paths, self.origins, self.keys = paths, origins, keys

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[str, str, str]:
        path = self.paths[i]
        try:
            open_image(path, self.origins.get(path, ""))
        except DataError as err:
            return path, str(err), ""
        return path, "", file_key(path) if self.keys else ""


class OnTheFlyFeatures:
    """Encodes the images of each batch at every step (no caching); with augmented views, the same views
    a :class:`~adaptkit.data.features.FeatureBank` would hold, made again at each lookup."""

    def __init__(
        self,
        backbone: VisionBackbone,
        paths: Sequence[str],
        device: torch.device,
        origins: dict[str, str] | None = None,
        skip_bad: bool = False,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        colours: dict[str, Colour] | None = None,
        workers: int = 0,
        desc: str = "checking images",
        progress: bool = False,
    ) -> None:
        """Every image is decoded once up front (in ``workers`` processes), so a bad one is known (skipped
        or raised) before training. ``dtype``: the storage dtype features are rounded through, as a bank
        would store them."""
        self.colours = colours or {}
        self.backbone = backbone
        self.device = device
        self.dtype = dtype
        self.augment = augment
        self.views = augment.views if augment is not None else 0
        self.seed = seed
        self.bad: dict[str, str] = {}
        self.paths: list[str] = []
        self.keys: dict[str, str] = {}
        self.origins = origins or {}
        probe = _Probe(list(dict.fromkeys(paths)), self.origins, keys=bool(self.views))
        loader = DataLoader(probe, batch_size=None, num_workers=workers)
        bar = tqdm(loader, total=len(probe), desc=desc, unit="img", disable=not progress)
        for path, error, key in bar:
            if error:
                if not skip_bad:
                    raise DataError(error)
                self.bad[path] = error
                continue
            self.paths.append(path)
            if self.views:
                self.keys[path] = key
        if not self.paths:
            raise DataError("no image could be decoded")
        self.rows = {path: i for i, path in enumerate(self.paths)}

    def pixels(self, rows: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """The backbone's input for image ``rows`` (with ``step``: the views :func:`view_choice` picks):
        decoded, augmented and preprocessed, on the CPU (what a DataLoader worker makes)."""
        rows = rows.to(torch.int64).cpu()
        views = view_choice(self.seed, step, self.views, rows) if step is not None else torch.zeros_like(rows)
        images = []
        for r, v in zip(rows.tolist(), views.tolist()):
            path = self.paths[r]
            img = open_image(path, self.origins.get(path, ""))
            images.append(make_view(img, self.keys.get(path, ""), self.augment, v, self.colours.get(path)))
        return self.backbone.preprocess(images)

    def load(self, rows: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """What a DataLoader worker makes ahead of the step: :meth:`pixels`."""
        return self.pixels(rows, step)

    @torch.no_grad()
    def finish(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, T, D)`` float32 features of ``pixels`` on the training device, rounded through the storage
        dtype."""
        return self.backbone(pixels.to(self.device)).to(self.dtype).float()

    def lookup(self, rows: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """Encodes image ``rows`` (with ``step``: the views :func:`view_choice` picks, like FeatureBank)."""
        return self.finish(self.pixels(rows, step))

    def stats(self, max_images: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean and std estimated from the first ``max_images`` images."""
        rows = torch.arange(min(max_images, len(self.paths)))
        feats = torch.cat([self.lookup(chunk) for chunk in rows.split(64)])
        flat = feats.reshape(-1, feats.shape[-1])
        return flat.mean(0), flat.std(0)


class StepTaggedBatches(Sampler[list[tuple[int, int, bool]]]):
    """The batches of ``inner`` (what this process's loader would draw, before Accelerate's sharding),
    each index tagged ``(index, step, used)``: the optimizer step the micro-batch is trained at, and False
    for the first ``skip`` micro-batches of this process in the epoch (a resumed run's consumed ones) and
    from step ``max_steps`` on (the loader draws ahead of the loop's end; a bank holds no views for them).

    With N processes, Accelerate hands process p the batches p, p + N, ... of ``inner``, so batch j is
    micro-batch j // N of every process's epoch."""

    def __init__(self, inner: Sampler, processes: int, accumulate: int, max_steps: int) -> None:
        self.inner, self.processes, self.accumulate = inner, processes, accumulate
        self.max_steps = max_steps
        self.batch_size = inner.batch_size
        self.drop_last = getattr(inner, "drop_last", False)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def steps_per_epoch(self) -> int:
        return -(-(len(self.inner) // self.processes) // self.accumulate)

    def __iter__(self):
        first = self.epoch * self.steps_per_epoch()
        for j, batch in enumerate(self.inner):
            micro = j // self.processes
            step = first + micro // self.accumulate
            used = micro >= self.skip and step < self.max_steps
            yield [(index, step, used) for index in batch]


class TaggedDataset(Dataset):
    """The task's dataset read by tagged batches: ``__getitems__`` hands the collate function the items
    with their batch's step and whether it is used."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, tagged: tuple[int, int, bool]):
        return self.dataset[tagged[0]]

    def __getitems__(self, tagged: list[tuple[int, int, bool]]) -> tuple[list, int, bool]:
        return [self.dataset[t[0]] for t in tagged], tagged[0][1], tagged[0][2]


class StepCollate:
    """The task's collate function, plus ``step`` and (for a batch the loop uses) what the feature source
    ``load``s for its image rows, made where the loader runs it: in a worker process."""

    def __init__(self, collate, features) -> None:
        self.collate, self.features = collate, features

    def __call__(self, data: tuple[list, int, bool]) -> dict:
        items, step, used = data
        batch = self.collate(items)
        batch["step"] = torch.tensor(step)
        if used:
            batch["loaded"] = self.features.load(batch["image"], step)
        return batch


def reads_ahead(features, workers: int, device: torch.device) -> bool:
    """Whether DataLoader workers read a feature store's rows ahead of the steps: with workers, on an
    accelerator. On CPU they measured slower (``benchmarks/image_workers.py --features store``, the default
    recipe, ABBA order: 2-4% fewer samples/s at the median, 14% more training time with 2): they share the
    cores with the step, and a batch's reads are under 1% of a CPU step."""
    return bool(workers) and torch.device(device).type != "cpu" and features.loadable_elsewhere


def step_loader(
    dataset: Dataset,
    sampler: StepTaggedBatches,
    collate,
    features,
    workers: int,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """Training's loader with each batch's images prepared by ``features.load``: in ``workers`` processes
    (0: the training process itself), two batches ahead each, started afresh each epoch.
    ``generator``: the run's shuffle generator, which a DataLoader also draws its workers' base seed from
    (so the order matches the plain loader's)."""
    # Workers start afresh each epoch (not persistent): a new iterator draws its base seed from the
    # generator before the shuffle does, each epoch, as the plain loader's does; a resumed run's too.
    extra = {"prefetch_factor": 2} if workers else {}
    return DataLoader(
        TaggedDataset(dataset),
        batch_sampler=sampler,
        collate_fn=StepCollate(collate, features),
        num_workers=workers,
        generator=generator,
        **extra,
    )


def step_features(run, batch: dict) -> torch.Tensor:
    """The features of a training micro-batch at ``run.step``: finished from what its loader prepared
    (checking the step it was prepared for), or looked up in the run's feature source."""
    loaded, step = batch.pop("loaded", None), batch.pop("step", None)
    if step is not None and int(step) != run.step:
        raise RuntimeError(
            f"the image loader made step {int(step)}'s views for step {run.step}: its schedule of "
            "optimizer steps is out of step with the loop's (a bug; please report it)"
        )
    if loaded is not None:
        return run.train.features.finish(loaded)
    return run.train.features.lookup(batch["image"], step=run.step)
