"""The files an ``adaptkit export --format hf-remote-code`` folder carries (``adaptkit.export_remote``):
``modeling_adaptkit.py`` and ``processing_adaptkit.py`` import torch, transformers and the vision towers'
libraries only, never adaptkit, because they run where adaptkit is not installed."""
