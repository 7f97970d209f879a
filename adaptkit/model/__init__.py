"""The multimodal model: wiring (``multimodal``), building it from a recipe (``build``), soft tokens at a
middle LM layer (``injection``, ``lower_states``), packed rows (``packing``) and decoding
(``generation``)."""

from adaptkit.model.build import (
    build_model,
    compile_lm_layers,
    count_parameters,
    frozen_fingerprint,
    prepare_for_training,
)
from adaptkit.model.multimodal import MultimodalModel

__all__ = [
    "MultimodalModel",
    "build_model",
    "compile_lm_layers",
    "count_parameters",
    "frozen_fingerprint",
    "prepare_for_training",
]
