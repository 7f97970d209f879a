"""adaptkit: parameter-efficient fine-tuning of multimodal models on frozen foundation encoders.

Frozen vision and language backbones, a trainable fusion adapter (``adaptkit.adapters``) and LoRA through
peft, trained with HF Accelerate for a task (``adaptkit.tasks``). Entry points: the ``adaptkit`` CLI,
:func:`adaptkit.recipes.load_recipe`, :func:`adaptkit.train.train`, :func:`adaptkit.runs.load_run` and
:func:`load_for_inference` (a run directory or an export folder → the task's predictor, whose
``predict(image, text)`` the CLI and the demo call; VQA's also has ``answer(image, question)``).
"""

__version__ = "0.1.0"


def load_for_inference(path, device=None, verify: bool = True):
    """A predictor for a run directory or an export folder (see :mod:`adaptkit.inference`)."""
    from adaptkit.inference import load_for_inference as load

    return load(path, device=device, verify=verify)
