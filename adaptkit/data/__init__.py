"""Datasets (easy-VQA, VQA JSONL), image features and batch collation."""
