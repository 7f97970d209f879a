"""The recipe's ``data`` section: what the task trains and evaluates on, how samples become LM text, and
the augmented views of the training images (``data.augment.*``)."""

from __future__ import annotations

from dataclasses import dataclass

from adaptkit.config.fields import knob, section


@dataclass
class AugmentConfig:
    """Fixed augmented views per training image (adaptkit/data/augment.py). Each view is encoded once and
    kept in the feature cache; each step shows every image as itself or one of its views, picked from
    (seed, step, image), so a resumed run stays exact. Off by default: which transforms keep an answer true
    depends on the data (the easy-VQA recipes rotate shapes by any angle and flip them; a photo's "left"
    or "upside down" would change), so a recipe turns on the ones its data allows."""

    views: int = knob(
        0,
        """augmented views per image besides itself (0: off). A run encodes the images themselves, then only
        the views its steps look up (known before step 0: its batches and each image's view are functions of
        the seed and step): at most one more encoding pass over the training images per view, and
        T x D x 4 bytes of disk per encoded view (easy-VQA at 224 px: 1.1 GB for all 4,000 images' view)""",
        low=0,
    )
    scale_min: float = knob(
        1.0, "content resized by a factor drawn log-uniformly in [scale_min, scale_max]", above=0.0
    )
    scale_max: float = knob(
        1.0, "(below 1 the content shrinks; the canvas around it keeps its border colour)", above=0.0
    )
    rotate: float = knob(
        0.0, "rotation in degrees, uniform in [-rotate, rotate] (180: any angle)", low=0.0, high=180.0
    )
    translate: float = knob(
        0.0, "shift, uniform up to this fraction of the width / height", low=0.0, high=0.5
    )
    flip: bool = knob(False, "horizontal and vertical flips, each with probability 1/2")
    brightness: float = knob(0.0, "brightness factor in [1 - b, 1 + b]", low=0.0, high=0.9)
    contrast: float = knob(
        0.0, "contrast factor in [1 - c, 1 + c] around the image's mean", low=0.0, high=0.9
    )
    channel_gain: float = knob(
        0.0,
        "each RGB channel scaled by a factor in [1 - g, 1] (tinted light; shifts the colours answers name)",
        low=0.0,
        below=1.0,
    )
    gradient: float = knob(
        0.0, "a linear illumination ramp of up to +-g across the image", low=0.0, below=1.0
    )
    blur: float = knob(
        0.0, "Gaussian blur sigma up to this fraction of the image side (0: off)", low=0.0, below=1.0
    )
    noise: float = knob(
        0.0, "Gaussian pixel noise, std up to this (pixels in [0, 1]; 0: off)", low=0.0, below=1.0
    )
    background: float = knob(
        0.0,
        """probability that a view's plain background (pixels near its border colour) is replaced by a
        gradient between two random soft colours (0: off)""",
        low=0.0,
        high=1.0,
    )
    shades: float = knob(
        0.0,
        """probability that a view's main colour (a flat shape's fill, its anti-aliased edge with it) moves
        to a shade drawn inside the region people give the colour name the image's answers give it (between
        two of the xkcd colour survey's tone-only shades of that name, nearer them than any other basic
        colour term's; adaptkit/data/colour_names.py; only images whose answers name one colour; 0: off).
        While on, the light changes above (brightness, contrast, channel_gain, gradient) of such an image's
        views are halved, then dropped, where they would move its colour out of its name's region""",
        low=0.0,
        high=1.0,
    )
    only_for: str = knob(
        "",
        """data specs these views suit, as comma-separated prefixes of data.train (e.g. "easyvqa:"): with
        other training data the views are off and the log says so, since which transforms keep an answer
        true depends on the data (empty: any data)""",
    )

    def suits(self, train: str) -> bool:
        """Whether these views apply to training data ``train`` (``only_for``)."""
        prefixes = [p.strip() for p in self.only_for.split(",") if p.strip()]
        return not prefixes or any(train.startswith(p) for p in prefixes)


@dataclass
class DataConfig:
    """What the task trains and evaluates on, and how samples become LM text."""

    train: str = knob(
        "easyvqa:train",
        """the training data: an embedded split (easyvqa:train, easyvqa-captions:train), a JSONL / COCO /
        LLaVA file, or hf:PATH[:SPLIT] (the task's formats: README, "Your own data")""",
    )
    eval: str = knob("easyvqa:test", "evaluated every eval_every steps (eval_limit samples) and at the end")
    prompt_template: str = knob(
        "{question}",
        """the LM prompt; VQA fills {question} and the answer follows after a space, then EOS (a longer
        "Question: {question} Answer:" costs 4 LM tokens per question and did no better in a measured run);
        captioning: the fixed prompt the caption follows""",
    )
    class_template: str = knob(
        "a {label}", "retrieval: a label's class prompt for classification and predict"
    )
    chat_template: bool = knob(
        False,
        """true: prompts rendered with the LM tokenizer's chat template (the question in the user turn,
        earlier turns of LLaVA conversations before it; the answer opens the assistant turn, EOS closes
        it)""",
    )
    on_bad_sample: str = knob(
        "skip",
        """skip: drop and count malformed lines and unusable images (missing, empty, truncated, not an image,
        under 8 px a side, decompression bombs; CMYK / RGBA / grayscale are converted); error: stop at the
        first one""",
        choices=("error", "skip"),
    )
    max_text_tokens: int = knob(
        1024,
        """the most LM tokens one sample's text may take (prompt, earlier turns, target and EOS): a longer one
        is a bad sample (data.long_text), so one oversized line cannot make a batch ask for gigabytes""",
        low=8,
    )
    long_text: str = knob(
        "skip",
        """what a text over max_text_tokens is: skip (a bad sample: skipped and counted, or an error with
        on_bad_sample=error) | truncate (kept, cut to fit with a warning: the prompt from its start, then the
        target from its end)""",
        choices=("skip", "truncate"),
    )
    max_skip_ratio: float = knob(
        0.01,
        "with skip: stop, listing the bad files, when more than this share of samples is bad",
        low=0.0,
        high=1.0,
    )
    augment: AugmentConfig = section(AugmentConfig, "augmented views of the training images (below)")

    def train_augment(self) -> AugmentConfig | None:
        """The training images' augmented views, or None: ``augment.views`` is 0, or ``augment.only_for``
        names other data than ``train``."""
        if not self.augment.views or not self.augment.suits(self.train):
            return None
        return self.augment
