"""The multimodal model: the data path (``multimodal``: features -> adapter -> LM -> objectives, over a typed
``batch``), how the image reaches the LM (``fusion``) and which decoder layers a pass runs (``decoder``,
``lower_states``, ``last_layer``), packed rows (``packing``), decoding (``generation``), what trains saved
and loaded (``trainables``), and building it all from a recipe (``build``)."""

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
