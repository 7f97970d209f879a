"""``--format hf-llava`` with a real LM's tokenizer and chat template: a random 32-px CLIP tower, the given LM
(default: the embedded SmolLM2), 30 steps of ``recipes/gpu_clip_llava.yaml`` on easy-VQA in float32 on this
CPU, then the export and its check in a process without adaptkit. Prints the check's figures.

    python benchmarks/hf_llava_real_lm.py --out /tmp/hf_llava_smollm2 [--lm embedded:smollm2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="a new folder for the tower, run and export")
    parser.add_argument("--lm", default="embedded:smollm2")
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from adaptkit.export_llava import export_llava
    from adaptkit.recipes import load_recipe
    from adaptkit.train import train

    root = args.out
    root.mkdir(parents=True)
    torch.manual_seed(0)
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 48, "intermediate_size": 64}
    vision |= {"num_hidden_layers": 2, "num_attention_heads": 4}
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
    config = CLIPConfig(text_config=text | {"vocab_size": 99}, vision_config=vision, projection_dim=16)
    CLIPModel(config).save_pretrained(root / "clip")
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(root / "clip")
    overrides = [
        f"output_dir={root / 'run'}",
        f"vision.name={root / 'clip'}",
        f"language.name={args.lm}",
        "language.dtype=float32",
        "language.compute_dtype=float32",
        "mixed_precision=no",
        "data.train=easyvqa:train",
        "data.eval=easyvqa:test",
        "max_steps=30",
        "batch_size=16",
        "lora.start_step=0",
        "eval_every=0",
        "eval_limit=16",
        "checkpoint_every=0",
        "compile=false",
        "vision.compile=false",
        f"feature_cache_dir={root / 'features'}",
    ]
    train(load_recipe("recipes/gpu_clip_llava.yaml", overrides))
    report = export_llava(root / "run", root / "llava", verify_samples=args.samples)
    keys = ("samples", "prompts_identical", "answers_identical", "max_abs_logit_diff")
    keys += ("max_abs_logit_diff_weights_vs_run", "passed", "seconds")
    print(json.dumps({k: report[k] for k in keys}))


if __name__ == "__main__":
    main()
