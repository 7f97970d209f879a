"""adaptkit: parameter-efficient fine-tuning of multimodal models on frozen foundation encoders.

Frozen vision and language backbones, a trainable fusion adapter (Q-Former) and LoRA through peft,
trained with HF Accelerate. Entry points: the ``adaptkit`` CLI, :func:`adaptkit.config.load_recipe`,
:func:`adaptkit.train.train` and :func:`adaptkit.runs.load_run`.
"""

__version__ = "0.1.0"
