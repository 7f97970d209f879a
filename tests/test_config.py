from __future__ import annotations

from pathlib import Path

import pytest

from adaptkit.config import RecipeError, load_recipe, recipe_to_yaml

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


@pytest.mark.parametrize("recipe", sorted(str(p) for p in Path("recipes").glob("*.yaml")))
def test_every_shipped_recipe_sets_and_documents_every_key(recipe):
    """Every recipe key appears in each shipped recipe, each with a comment saying what it does; the recipe
    loads and opens with the command that runs it."""
    from dataclasses import fields, is_dataclass

    from adaptkit.config import Recipe, _key_lines

    def keys(obj, prefix=""):
        for f in fields(obj):
            value = getattr(obj, f.name)
            if is_dataclass(value):
                yield from keys(value, f"{prefix}{f.name}.")
            else:
                yield prefix + f.name

    load_recipe(recipe)
    text = Path(recipe).read_text().splitlines()
    assert text[0].startswith("# Run:") and "adaptkit train " + recipe in text[0]
    lines = _key_lines(Path(recipe))
    assert [k for k in keys(Recipe()) if k not in lines] == []
    sections = {k.split(".")[0] for k in lines if "." in k}
    assert [k for k, n in lines.items() if "#" not in text[n - 1] and k not in sections] == []
