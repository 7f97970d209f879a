"""Loading a recipe for use: the schema's parse and checks (``adaptkit.config``, which knows no task or
adapter) plus the checks that need the registries: the task and adapter kind exist, and each one's own
rules (``Task.config_problem``, ``FusionAdapter.config_problem``) hold."""

from __future__ import annotations

from pathlib import Path

from adaptkit.config import Recipe, RecipeError, parse_recipe

__all__ = ["Recipe", "RecipeError", "check_registered", "load_recipe"]


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a recipe YAML and apply ``key=value`` overrides (dotted keys reach nested sections), then check
    it against the schema and the registries.

    Args:
        path: the recipe file; None starts from the schema's defaults.
        overrides: command-line items such as ``max_steps=200`` or ``language.quant=4bit``.

    Raises:
        RecipeError: unreadable file, unknown key, wrong type, a value outside its choices, or settings the
            task or adapter cannot work with; the message names the recipe and the key.
    """
    recipe = parse_recipe(path, overrides)
    check_registered(recipe, str(path) if path else "defaults")
    return recipe


def check_registered(recipe: Recipe, source: str = "recipe") -> None:
    """The checks that need the task and adapter registries (``adaptkit.tasks``, ``adaptkit.adapters``)."""
    from adaptkit.adapters import ADAPTERS
    from adaptkit.tasks import TASKS

    for key, value, known in (("task", recipe.task, TASKS), ("adapter.kind", recipe.adapter.kind, ADAPTERS)):
        if value not in known:
            raise RecipeError(f"{source}: {key}={value!r} is not one of {', '.join(known)}")
    task, adapter = TASKS[recipe.task], ADAPTERS[recipe.adapter.kind]
    for problem in (task.config_problem(recipe), adapter.config_problem(recipe.adapter)):
        if problem:
            raise RecipeError(f"{source}: {problem}")
    reads_prompt = adapter.reads_prompt(recipe.adapter)
    if recipe.pack_questions > 1 and reads_prompt:
        raise RecipeError(
            f"{source}: pack_questions={recipe.pack_questions} needs soft tokens that depend on the image "
            f"alone: set {reads_prompt}=false (or pack_questions=1)"
        )
    field_name = task.prompt_field
    if field_name and "{" + field_name + "}" not in recipe.data.prompt_template:
        raise RecipeError(
            f"{source}: data.prompt_template must contain '{{{field_name}}}' for task {recipe.task}"
        )
