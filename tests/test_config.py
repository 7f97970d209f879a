from __future__ import annotations

import re
from pathlib import Path

import pytest

from adaptkit.config import RecipeError, recipe_to_yaml
from adaptkit.recipes import load_recipe

RECIPE = "recipes/easyvqa_qformer_lora.yaml"


def test_default_recipe_loads_with_overrides():
    recipe = load_recipe(RECIPE, ["max_steps=200", "output_dir=runs/x", "language.quant=4bit"])
    assert recipe.max_steps == 200
    assert recipe.output_dir == "runs/x"
    assert recipe.language.quant == "4bit"
    assert recipe.adapter.kind == "qformer"


def test_unknown_key_in_file_names_key_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("max_steps: 3\nadapter:\n  num_querys: 8\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert f"{path}:3" in str(err.value)
    assert "adapter.num_querys" in str(err.value)
    assert "unknown key" in str(err.value)


def test_unknown_override_names_key():
    with pytest.raises(RecipeError, match="maxsteps.*unknown key"):
        load_recipe(RECIPE, ["maxsteps=3"])


def test_wrong_type_and_choice_errors():
    with pytest.raises(RecipeError, match="max_steps"):
        load_recipe(RECIPE, ["max_steps=abc"])
    with pytest.raises(RecipeError, match="language.quant='3bit' is not one of"):
        load_recipe(RECIPE, ["language.quant=3bit"])
    with pytest.raises(RecipeError, match="must look like key=value"):
        load_recipe(RECIPE, ["max_steps"])
    with pytest.raises(RecipeError, match="prompt_template"):
        load_recipe(RECIPE, ["data.prompt_template=no placeholder"])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(bad)


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(RECIPE, ["lora.r=4", "lora.target_modules=[q_proj]"])
    path = tmp_path / "resolved.yaml"
    path.write_text(recipe_to_yaml(recipe))
    assert load_recipe(path) == recipe


def test_text_override_with_braces_is_taken_as_written():
    recipe = load_recipe(RECIPE, ["data.prompt_template={question}", "output_dir=runs/{x}"])
    assert recipe.data.prompt_template == "{question}"
    assert recipe.output_dir == "runs/{x}"
    # Non-text fields still parse as YAML.
    assert load_recipe(RECIPE, ["vision.extra_layers=[1, 2]"]).vision.extra_layers == [1, 2]
    # A template YAML cannot parse unquoted, quoted or not.
    for item in ("data.prompt_template={question} Answer:", 'data.prompt_template="{question} Answer:"'):
        assert load_recipe(RECIPE, [item]).data.prompt_template == "{question} Answer:"


def test_unparsable_override_value_names_the_override():
    with pytest.raises(RecipeError, match=r"override 'vision.extra_layers=\[1, 2' is not a valid value"):
        load_recipe(RECIPE, ["vision.extra_layers=[1, 2"])


SHIPPED = sorted(str(p) for p in Path("recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", SHIPPED)
def test_every_shipped_recipe_says_only_what_it_changes(recipe):
    """A shipped recipe opens with the command that runs it, loads, stays short, and sets only keys whose
    value differs from the schema's default (the schema documents them all, so a recipe need not)."""
    import yaml

    from adaptkit.config import Recipe
    from adaptkit.config.fields import walk

    text = Path(recipe).read_text().splitlines()
    assert text[0].startswith("# Run:") and "adaptkit train " + recipe in text[0]
    assert len(text) <= 120
    load_recipe(recipe)
    defaults = {key: value for key, value, _ in walk(Recipe())}

    def leaves(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict) and prefix + key != "adapter.options":
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield prefix + key, value

    same = [k for k, v in leaves(yaml.safe_load(Path(recipe).read_text())) if defaults[k] == v]
    assert same == [], f"{recipe} repeats the schema's defaults of {same}"


def test_the_schema_documents_every_key_and_its_choices():
    from dataclasses import fields

    from adaptkit.config import Recipe
    from adaptkit.config.fields import field_docs, walk

    docs = field_docs(Recipe)
    assert [k for k, doc in docs.items() if len(doc) < 10] == []  # sections included
    assert {k for k, _, _ in walk(Recipe())} <= set(docs)
    assert "torchvision" in docs["vision.family"] and "k > 0" in docs["adapter.inject_layer"]
    choices = {k: f.metadata.get("choices") for k, _, f in walk(Recipe()) if f.metadata.get("choices")}
    assert choices["language.quant"] == ("none", "8bit", "4bit") and "mixed_precision" in choices
    assert all(f.metadata.get("doc") for f in fields(Recipe))


def test_recipe_show_documents_every_key_and_loads_back(tmp_path):
    from adaptkit.config.docs import show
    from adaptkit.config.fields import walk

    recipe = load_recipe(RECIPE, ["max_steps=200"])
    listing = show(recipe, "test")
    for key, _, _ in walk(recipe):
        assert f"{key.rsplit('.', 1)[-1]}:" in listing
    assert "max_steps: 200" in listing and "[default: 1000]" in listing  # what differs from the schema
    assert "(not read: adapter.kind is qformer)" in listing  # the other kinds' sections
    path = tmp_path / "shown.yaml"
    path.write_text(listing)
    assert load_recipe(path) == recipe  # the listing is a complete, documented recipe


def test_recipe_diff_names_what_differs():
    from adaptkit.config import Recipe
    from adaptkit.config.docs import diff, format_diff

    default = load_recipe(RECIPE)
    rows = diff(Recipe(), default)
    keys = [k for k, _, _ in rows]
    assert "adapter.inject_layer" in keys and "data.augment.views" in keys and "max_steps" not in keys
    projector = load_recipe("recipes/easyvqa_projector_lora.yaml")
    table = format_diff(diff(default, projector), "qformer", "projector")
    assert "adapter.kind" in table and "qformer  ->  projector" in table
    assert "resolve to the same recipe" in format_diff([], "a", "b")


def test_recipe_commands_show_and_diff(capsys):
    from adaptkit.cli import main

    assert main(["recipe", "show", RECIPE, "lora.r=8"]) == 0
    out = capsys.readouterr().out
    assert "  r: 8" in out and "LoRA rank" in out and "[default: 16]" in out
    assert main(["recipe", "diff", RECIPE, "recipes/easyvqa_xattn_lora.yaml"]) == 0
    out = capsys.readouterr().out
    assert "adapter.xattn.layers" in out and "[20, 22, 24, 26, 28]" in out
    assert main(["recipe", "diff", RECIPE]) == 0  # against the schema's defaults
    assert re.search(r"adapter.inject_layer +0  ->  20", capsys.readouterr().out)
    assert main(["recipe", "show", RECIPE, "adapter.kind=mlp"]) == 2
    assert "adapter.kind='mlp' is not one of" in capsys.readouterr().err


def test_flat_adapter_keys_of_earlier_recipes_move_into_their_sections(tmp_path, caplog):
    """Run directories of earlier versions hold recipes with flat adapter keys: they still load."""
    old = tmp_path / "old.yaml"
    old.write_text(
        "adapter:\n  kind: xattn\n  num_queries: 8\n  num_heads: 6\n  mlp_ratio: 2.0\n  pool_tokens: 0\n"
        "  xattn_layers: [20, 22]\n  xattn_resampler: true\n  text_conditioned: false\n"
    )
    recipe = load_recipe(old)
    xattn, resampler = recipe.adapter.xattn, recipe.adapter.resampler
    assert xattn.layers == [20, 22] and xattn.resampler and xattn.num_heads == 6 and xattn.mlp_ratio == 2.0
    assert resampler.num_queries == 8 and resampler.num_heads == 6  # the resampler shared those keys
    assert "flat adapter keys" in caplog.text
    # Overrides too, into the sections of the kind the recipe ends up with.
    got = load_recipe(RECIPE, ["adapter.num_queries=4", "adapter.kind=resampler", "adapter.hidden_size=96"])
    assert got.adapter.resampler.num_queries == 4 and got.adapter.resampler.hidden_size == 96
    assert load_recipe(
        RECIPE, ["adapter.text_conditioned=true", "pack_questions=1"]
    ).adapter.qformer.text_conditioned
    with pytest.raises(RecipeError, match="adapter.num_querys"):
        load_recipe(RECIPE, ["adapter.num_querys=4"])  # a misspelt key is still an error


def test_the_config_layer_needs_neither_torch_nor_the_registries():
    """Parsing and checking a recipe against the schema, and listing it, load no model code."""
    import subprocess
    import sys

    code = (
        "import sys; from adaptkit.config import parse_recipe; from adaptkit.config.docs import show; "
        f"show(parse_recipe({RECIPE!r})); "
        "heavy = ('torch', 'PIL', 'transformers', 'peft', 'accelerate'); "
        "ours = tuple('adaptkit.' + m for m in ('tasks', 'adapters', 'model', 'data', 'backbones')); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith(ours)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
