"""`adaptkit train`: ``setup`` (everything before the first step), ``loop`` (the steps, evaluation and
checkpoint hooks, the summary), ``optim`` (AdamW groups and schedule), ``resume`` (new run or
checkpoint), ``records`` (log, metrics.jsonl, trackers)."""

from adaptkit.train.loop import train
from adaptkit.train.optim import build_optimizer, build_scheduler, param_groups

__all__ = ["build_optimizer", "build_scheduler", "param_groups", "train"]
