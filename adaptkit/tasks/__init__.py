"""Tasks, chosen by ``task`` in a recipe: what is learned, from which data, scored how.

``TASKS`` maps each name to its class (one file per task in this folder, each implementing
:class:`adaptkit.tasks.base.Task`); the loop, evaluation, export, predict and the demo ask the task
:func:`get_task` returns. Adding one: ``docs/extending.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adaptkit.tasks.base import Task
from adaptkit.tasks.captioning import CaptionTask
from adaptkit.tasks.retrieval import RetrievalTask
from adaptkit.tasks.vqa import VQATask

if TYPE_CHECKING:
    from adaptkit.config import Recipe

TASKS: dict[str, type[Task]] = {"vqa": VQATask, "retrieval": RetrievalTask, "caption": CaptionTask}


def get_task(recipe: Recipe) -> Task:
    """The task a recipe names, set up with that recipe."""
    if recipe.task not in TASKS:
        raise ValueError(f"task={recipe.task!r} is not one of {', '.join(TASKS)}")
    return TASKS[recipe.task](recipe)
