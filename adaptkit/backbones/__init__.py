"""Frozen modal-specific encoders: vision backbones and the causal language model."""
