"""Saving and loading what a run trains: the adapter and the saved heads (safetensors), LoRA (peft's own
format) and a text encoder's LoRA. The file names are ``adaptkit.artifacts``'."""

from __future__ import annotations

from pathlib import Path

import torch

from adaptkit.artifacts import ADAPTER_FILE, HEADS_FILE, LORA_DIR, TEXT_LORA_FILE, ArtifactError

#: heads of ``Objectives`` saved with a run (used at inference): image-text embedding and matching.
SAVED_HEADS = ("embed", "itm")


def saved_heads(model) -> dict[str, torch.Tensor]:
    """The state of the objectives' heads that inference uses (``SAVED_HEADS``: the image-text embedding
    and matching heads; VQA's answer head only trains the adapter and is not kept)."""
    return {
        f"{name}.{key}": value.detach().cpu().contiguous()
        for name, head in model.objectives.heads.items()
        if name in SAVED_HEADS
        for key, value in head.state_dict().items()
    }


def save_trainables(model, directory: str | Path) -> None:
    """Write the adapter and the saved heads (safetensors) and LoRA (peft format) into ``directory``."""
    from adaptkit.artifacts import save_safetensors as save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.adapter.state_dict().items()}
    save_file(state, str(directory / ADAPTER_FILE))
    heads = saved_heads(model)
    if heads:
        save_file(heads, str(directory / HEADS_FILE))
    if hasattr(model.lm, "save_pretrained") and hasattr(model.lm, "peft_config"):
        model.lm.save_pretrained(str(directory / LORA_DIR))
    if model.text_encoder is not None and model.text_encoder.trainable:
        save_file(model.text_encoder.lora_state(), str(directory / TEXT_LORA_FILE))


def _read(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or an error naming it (truncated, not safetensors, unreadable)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(
            f"{path} is not a readable safetensors file ({err}); retrain or restore it"
        ) from None


def load_trainables(model, directory: str | Path, heads: bool = True) -> None:
    """Load the adapter (and, with ``heads``, the saved heads and a text encoder's LoRA) written by
    :func:`save_trainables` (strict: shapes and keys must match). LoRA itself is loaded by peft when the
    model is built (``build_model(lora_dir=...)``)."""
    path = Path(directory) / ADAPTER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; is {directory} a run directory of `adaptkit train`?")
    try:
        model.adapter.load_state_dict(_read(path), strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path} does not fit this recipe's adapter: {err}") from None
    expected = saved_heads(model)
    if not expected or not heads:
        return
    path = Path(directory) / HEADS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the recipe's image-text heads were not saved")
    state = _read(path)
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in state):
        raise ValueError(f"{path} does not fit this recipe's heads (keys or shapes differ)")
    for name, head in model.objectives.heads.items():
        if name in SAVED_HEADS:
            prefix = name + "."
            head.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    load_text_lora(model, directory)


def load_text_lora(model, directory: str | Path) -> bool:
    """Load ``text_lora.safetensors`` into a text encoder whose LoRA trains (False: it has none)."""
    if model.text_encoder is None or not model.text_encoder.trainable:
        return False
    path = Path(directory) / TEXT_LORA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the run's text-encoder LoRA was not saved")
    model.text_encoder.load_lora_state(_read(path), str(path))
    return True
