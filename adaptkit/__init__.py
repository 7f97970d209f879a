"""adaptkit: parameter-efficient fine-tuning of multimodal models on frozen foundation encoders.

Frozen vision and language backbones, a trainable fusion adapter (Q-Former) and LoRA through peft,
trained with HF Accelerate. Entry points: the ``adaptkit`` CLI, :func:`adaptkit.config.load_recipe`,
:func:`adaptkit.train.train`, :func:`adaptkit.runs.load_run` and :func:`load_for_inference` (a run
directory or an export folder → a predictor with ``answer(image, question)``).
"""

__version__ = "0.1.0"


def load_for_inference(path, device=None, verify: bool = True):
    """A predictor for a run directory or an export folder (see :mod:`adaptkit.inference`)."""
    from adaptkit.inference import load_for_inference as load

    return load(path, device=device, verify=verify)
