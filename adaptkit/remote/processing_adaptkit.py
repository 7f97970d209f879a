"""The processor of an ``adaptkit export --format hf-remote-code`` folder: images to the tower's pixels as
adaptkit preprocessed them, the prompt to token ids behind the image's lead, rows left-padded.

``text`` is the prompt as adaptkit renders it (``apply_chat_template`` on a conversation gives exactly
that, with ``<image>`` in front). The ids are ``lead`` (the sink token and one ``<image>`` per soft token, as
the model's config says) followed by the prompt's tokens, with no special token of the tokenizer's own.
A retrieval export's processor (``text_max_length`` set) takes candidate texts instead and tokenizes them
for the text encoder as the run did (its special tokens, right padding, cut to ``text_max_length``).
"""

from __future__ import annotations

import torch
from transformers import BatchFeature, ProcessorMixin

IMAGE_TOKEN = "<image>"


class AdaptkitProcessor(ProcessorMixin):
    """``tower``: how the vision tower reads images (``family`` and its settings); ``lead``: the token ids in
    front of every prompt."""

    def __init__(
        self, tokenizer=None, tower=None, lead=None, chat_template=None, text_max_length=None, **kwargs
    ) -> None:
        self.tower = tower or {}
        self.lead = list(lead or [])
        self.text_max_length = text_max_length  # set for retrieval: texts for the text encoder
        super().__init__(tokenizer, chat_template=chat_template)
        self._transform = None

    def pixels(self, images) -> torch.Tensor:
        """``(B, 3, H, W)`` pixels of PIL images for the tower."""
        rgb = [image.convert("RGB") for image in images]
        family = self.tower["family"]
        if family == "torchvision":  # bicubic resize to a square, [0, 1]; the tower normalises
            from PIL import Image

            size = self.tower["image_size"]
            arrays = [
                torch.frombuffer(
                    bytearray(i.resize((size, size), Image.BICUBIC).tobytes()), dtype=torch.uint8
                )
                for i in rgb
            ]
            return torch.stack(arrays).view(len(rgb), size, size, 3).permute(0, 3, 1, 2).float().div_(255.0)
        if self._transform is None:
            if family == "timm":  # the model's pretrained eval transform
                from timm.data import create_transform

                data = dict(
                    self.tower["data_config"], input_size=tuple(self.tower["data_config"]["input_size"])
                )
                self._transform = create_transform(**data, is_training=False)
            elif family == "open_clip":  # open_clip's evaluation transform for the model
                from open_clip.transform import PreprocessCfg, image_transform_v2

                self._transform = image_transform_v2(
                    PreprocessCfg(**self.tower["preprocess"]), is_train=False
                )
            else:  # the transformers tower's own image processor
                import transformers

                spec = dict(self.tower["image_processor"])
                self._transform = getattr(transformers, spec.pop("class"))(**spec)
        if family in ("timm", "open_clip"):
            return torch.stack([self._transform(image) for image in rgb])
        return self._transform(images=rgb, return_tensors="pt")["pixel_values"]

    def __call__(self, images=None, text=None, return_tensors: str = "pt", **kwargs) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text or [])
        if self.text_max_length:  # retrieval: the encoder's own special tokens and padding, cut to its length
            tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.text_max_length)
            data = {k: tokens[k] for k in ("input_ids", "attention_mask")} if texts else {}
        else:
            rows = []
            for prompt in texts:
                prompt = prompt[len(IMAGE_TOKEN) :] if prompt.startswith(IMAGE_TOKEN) else prompt
                rows.append(self.lead + self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            width = max((len(r) for r in rows), default=0)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            data = {
                "input_ids": torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long),
                "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
            }
        if images is not None:
            data["pixel_values"] = self.pixels(images if isinstance(images, (list, tuple)) else [images])
        return BatchFeature(data, tensor_type=return_tensors)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)
