"""Recipes as typed, documented dataclasses: the schema (``schema.py``, ``adapters.py``: every key's
meaning, default and allowed values beside it), reading YAML + ``key=value`` overrides onto it
(``load.py``), the checks the schema alone can make (``checks.py``) and the documented listing and diff of
resolved recipes (``docs.py``).

This layer imports neither torch nor the task and adapter registries; ``adaptkit.recipes.load_recipe``
adds the checks that need them and is what the rest of adaptkit calls.
"""

from adaptkit.config.adapters import (
    AdapterConfig,
    ProjectorConfig,
    QFormerConfig,
    ResamplerConfig,
    XAttnConfig,
)
from adaptkit.config.checks import RecipeError
from adaptkit.config.data import AugmentConfig, DataConfig
from adaptkit.config.load import parse_recipe, recipe_to_yaml
from adaptkit.config.schema import (
    LanguageConfig,
    LoraConfig,
    ObjectivesConfig,
    Recipe,
    TextEncoderConfig,
    VisionConfig,
)

__all__ = [
    "AdapterConfig",
    "AugmentConfig",
    "DataConfig",
    "LanguageConfig",
    "LoraConfig",
    "ObjectivesConfig",
    "ProjectorConfig",
    "QFormerConfig",
    "Recipe",
    "RecipeError",
    "ResamplerConfig",
    "TextEncoderConfig",
    "VisionConfig",
    "XAttnConfig",
    "parse_recipe",
    "recipe_to_yaml",
]
