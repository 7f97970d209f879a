"""A data spec → samples → frozen image features → a task's dataset: what training and evaluation share.

``prepare_split`` loads a spec with the task's formats, encodes each distinct image once with the frozen
backbone (``FeatureBank``, optionally through the disk cache), drops and lists unusable samples, and builds
the task's tokenized dataset over the feature rows.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adaptkit.assets import cache_dir
from adaptkit.data.augment import border_colour, main_colour
from adaptkit.data.colour_names import Colour, data_palette, image_colours
from adaptkit.data.feature_cache import FeatureCache
from adaptkit.data.features import FeatureBank
from adaptkit.data.formats import DataError
from adaptkit.data.images import open_image
from adaptkit.data.pixels import OnTheFlyFeatures
from adaptkit.data.records import bad_sample
from adaptkit.data.sampling import shown_views

log = logging.getLogger("adaptkit")


def subset(samples: list, limit: int | None, seed: int = 0) -> list:
    """A fixed random subset of ``limit`` samples in their original order (all when limit is falsy)."""
    if not limit or limit >= len(samples):
        return list(samples)
    keep = sorted(random.Random(seed).sample(range(len(samples)), limit))
    return [samples[i] for i in keep]


def feature_cache_root(setting: str) -> Path | None:
    """The disk cache folder a recipe's ``feature_cache_dir`` names (None: keep features in memory only)."""
    if setting in ("", "none", "off"):
        return None
    if setting == "auto":
        return cache_dir() / "features"
    return Path(setting).expanduser()


def with_palette(colours: dict[str, str], origins: dict[str, str]) -> dict[str, Colour]:
    """image → :class:`Colour`: its colour name with the data's own palette (each name's main colours as
    these images draw them), so ``augment.shades`` never draws a shade the data names otherwise. Images
    that cannot be read are left to the images' own check."""
    mains = {}
    for path in tqdm(colours, desc="data.augment.shades: the data's palette", leave=False, mininterval=2):
        try:
            img = open_image(path, origins.get(path, ""))
        except DataError:
            continue
        found = main_colour(img, list(border_colour(img)))
        if found is not None:
            mains[path] = found
    palette = data_palette(mains, colours)
    log.info("data.augment.shades: the data's own palette: %s", ", ".join(f"{n} {rgb}" for n, rgb in palette))
    return {path: Colour(name, palette) for path, name in colours.items()}


def build_features(
    vision,
    samples: list,
    device,
    cache: bool,
    skip_bad: bool,
    desc: str,
    progress: bool = True,
    cache_root: Path | FeatureCache | None = None,
    augment=None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
    defer_views: bool = False,
    workers: int = 0,
):
    """Feature source for the images of ``samples``: encoded once (cache) or at every lookup; with
    ``augment`` (a :class:`~adaptkit.config.AugmentConfig` with views > 0), also its augmented views.

    With ``cache_root`` (a cache folder, or a :class:`FeatureCache` already keyed for ``vision``, which
    saves hashing the backbone again), features persist on disk, keyed by backbone and image content.
    ``dtype``: the storage dtype (recipe key ``feature_dtype``); a given ``FeatureCache`` has its own.
    ``compile``: encode through the compiled backbone where it pays (recipe key ``vision.compile``).
    ``defer_views``: encode the augmented views later, those the run shows (:func:`encode_shown_views`).
    ``workers``: processes that check the images when features are computed every step (``cache=False``).
    """
    paths = [s.image for s in samples]
    origins: dict[str, str] = {}
    for s in samples:
        origins.setdefault(s.image, s.origin)
    colours = image_colours(samples) if augment is not None and augment.views and augment.shades else None
    if colours is not None:
        found = f"{len(colours)} of {len(origins)} images have one colour name in their answers"
        log.info("data.augment.shades: %s", found)
        colours = with_palette(colours, origins)
    if not cache:
        checks = desc.replace("encoding", "checking")
        return OnTheFlyFeatures(
            vision, paths, device, origins, skip_bad, augment, seed, dtype, colours, workers, checks, progress
        )
    disk = cache_root
    if cache_root is not None and not isinstance(cache_root, FeatureCache):
        disk = FeatureCache.for_backbone(cache_root, vision, device, dtype)
    return FeatureBank.compute(
        vision,
        paths,
        origins,
        device,
        skip_bad=skip_bad,
        desc=desc,
        disable_progress=not progress,
        cache=disk,
        augment=augment,
        seed=seed,
        dtype=dtype,
        compile=compile,
        colours=colours,
        defer_views=defer_views,
    )


def encode_shown_views(features, sampler, dataset, recipe) -> None:
    """Encode (or read from the cache) the augmented views of the training images that the run's
    ``recipe.max_steps`` steps look up, replayed from ``sampler``'s global batches; every view where
    the batches are a plain shuffle (``sampler`` None)."""
    views = features.views if isinstance(features, FeatureBank) else 0
    if not views:
        return
    shown = None
    if sampler is not None:
        shown = shown_views(
            sampler.inner,
            dataset.image_rows,
            len(features.rows),
            views,
            recipe.seed,
            recipe.max_steps,
            recipe.grad_accum_steps,
        )
    added = features.add_views(shown)
    used = int(shown[1:].sum()) if shown is not None else views * len(features.rows)
    log.info(
        "augmented views: the run's %d steps look up %d of the %d views (%d per image); %d of them newly "
        "encoded or read",
        recipe.max_steps,
        used,
        views * len(features.rows),
        views,
        added,
    )


def bound_text_length(task, samples: list, tokenizer, on_bad_sample: str) -> tuple[list, list[str]]:
    """``samples`` whose LM text fits ``data.max_text_tokens``, and the others as bad samples (``origin:
    reason``; with ``data.long_text=truncate`` they are all kept and the dataset cuts them)."""
    data = task.recipe.data
    limit = data.max_text_tokens
    lengths = task.text_lengths(samples, tokenizer)
    over = {i: n for i, n in enumerate(lengths) if n > limit}
    if not over:
        return samples, []
    if data.long_text == "truncate":
        log.warning(
            "%d samples have texts over data.max_text_tokens=%d LM tokens (the longest %d): cut to fit "
            "(data.long_text=truncate)",
            len(over),
            limit,
            max(over.values()),
        )
        return samples, []
    skipped: list[str] = []
    for i, n in over.items():
        problem = f"its text is {n} LM tokens, more than data.max_text_tokens={limit}"
        what = "sample (or raise data.max_text_tokens, or set data.long_text=truncate)"
        bad_sample(skipped, samples[i].origin, problem, on_bad_sample, what)
    return [s for i, s in enumerate(samples) if i not in over], skipped


def prepare_split(
    task,
    model,
    spec: str,
    device,
    limit: int | None = None,
    cache: bool = True,
    on_bad_sample: str = "error",
    progress: bool = True,
    desc: str = "encoding images",
    cache_root: Path | FeatureCache | None = None,
    max_skip_ratio: float = 1.0,
    augment=None,
    seed: int = 0,
    defer_views: bool = False,
):
    """Load a data spec with ``task``'s formats, encode its images and build the task's dataset.

    Bad samples (malformed lines, unusable images) raise with ``on_bad_sample="error"``; with ``skip``
    they are dropped and listed, and the call fails (naming them) when more than ``max_skip_ratio`` of
    the samples are bad.

    Returns:
        ``(dataset, features, skipped)`` (``augment``, ``seed``, ``defer_views``: the training split's
        augmented views, see :func:`build_features`) where ``skipped`` lists ``origin: reason`` of
        dropped samples.
    """
    data = task.load(spec, on_bad_sample)
    samples, too_long = bound_text_length(task, subset(data.samples, limit), model.tokenizer, on_bad_sample)
    features = build_features(
        model.vision,
        samples,
        device,
        cache,
        on_bad_sample == "skip",
        desc,
        progress,
        cache_root,
        augment,
        seed,
        model.feature_dtype,  # the run's feature_dtype: what it trained on
        task.recipe.vision.compile,
        defer_views,
        task.recipe.image_workers,
    )
    skipped = (
        list(data.skipped) + too_long + [features.bad[s.image] for s in samples if s.image in features.bad]
    )
    total = len(samples) + len(data.skipped) + len(too_long)
    if skipped and len(skipped) > max_skip_ratio * total:
        shown = "\n  ".join(skipped[:20]) + (
            f"\n  ... and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        )
        raise DataError(
            f"{spec}: {len(skipped)} of {total} samples ({len(skipped) / total:.1%}) are unusable, more than "
            f"data.max_skip_ratio={max_skip_ratio}:\n  {shown}\n"
            "Fix or remove them, or raise data.max_skip_ratio"
        )
    if features.bad:
        log.warning(
            "%s: skipped %d samples whose image is unusable (%d images), first: %s",
            spec,
            len(skipped) - len(data.skipped),
            len(features.bad),
            next(iter(features.bad.values())),
        )
    dataset = task.dataset(samples, features.rows, model.tokenizer)
    return dataset, features, skipped


def fill_cache(recipe, recipe_path, task, device) -> Iterator[str]:
    """``adaptkit cache``: encode the recipe's training and eval images (and training's augmented views)
    into the disk cache, reading them with ``task``'s loader; yields one line per data spec as it is done."""
    from adaptkit.backbones.vision import build_vision_backbone
    from adaptkit.data.feature_cache import STORAGE_DTYPES

    root = feature_cache_root(recipe.feature_cache_dir)
    if root is None or not recipe.cache_features:
        raise ValueError(
            f"{recipe_path}: the recipe keeps no disk cache (cache_features={recipe.cache_features}, "
            f"feature_cache_dir={recipe.feature_cache_dir!r}); set cache_features=true feature_cache_dir=auto"
        )
    vision = build_vision_backbone(recipe.vision, device)
    disk_cache = FeatureCache.for_backbone(root, vision, device, STORAGE_DTYPES[recipe.feature_dtype])
    augment = recipe.data.train_augment()
    views = augment.views if augment is not None else 0
    for spec in dict.fromkeys([recipe.data.train, recipe.data.eval]):
        data = task.load(spec, recipe.data.on_bad_sample)
        train_views = views if spec == recipe.data.train else 0  # training's augmented views
        extra = f" and {train_views} augmented views each" if train_views else ""
        bank = build_features(
            vision,
            data.samples,
            device,
            cache=True,
            skip_bad=recipe.data.on_bad_sample == "skip",
            desc=f"caching {spec}{extra}",
            cache_root=disk_cache,
            augment=augment if train_views else None,
            compile=recipe.vision.compile,
        )
        cached = f"{len(bank.rows)} images cached" + (
            f" (+ {train_views} augmented views each)" if train_views else ""
        )
        yield f"{spec}: {cached}, features {bank.shape}, {len(bank.bad)} undecodable"
