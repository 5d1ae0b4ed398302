from pathlib import Path

import pytest

from llmkit.errors import LlmkitError
from llmkit.recipe import copy_recipe, load_recipe, recipe_to_toml, shipped_recipe_names, shipped_recipes_dir


@pytest.mark.parametrize("name", shipped_recipe_names())
def test_shipped_recipes_validate(name):
    recipe = load_recipe(shipped_recipes_dir() / f"{name}.toml")
    assert recipe.run.name == name


def test_defaults_without_a_file():
    recipe = load_recipe(None)
    assert recipe.train.objective == "causal" and recipe.data.validation_fraction == 0.1


def test_unknown_key_names_file_and_closest_key(recipe_file):
    path = recipe_file("[train]\nlearnig_rate = 1e-3\n")
    with pytest.raises(LlmkitError, match=r"recipe\.toml: unknown key 'train\.learnig_rate' \(did you mean 'train\.learning_rate'\?\)"):
        load_recipe(path)


def test_unknown_table_is_refused(recipe_file):
    with pytest.raises(LlmkitError, match="unknown key 'trian'.*did you mean 'train'"):
        load_recipe(recipe_file("[trian]\nmax_steps = 1\n"))


def test_wrong_type_names_key_and_expectation(recipe_file):
    with pytest.raises(LlmkitError, match="train.max_steps must be an integer, got 'many'"):
        load_recipe(recipe_file('[train]\nmax_steps = "many"\n'))


def test_choice_outside_literal_is_refused(recipe_file):
    with pytest.raises(LlmkitError, match="tokenizer.kind must be one of 'char', 'bpe', got 'word'"):
        load_recipe(recipe_file('[tokenizer]\nkind = "word"\n'))


def test_out_of_range_value_names_key():
    with pytest.raises(LlmkitError, match=r"data.validation_fraction must be in \(0, 1\), got 1.5"):
        load_recipe(None, ["data.validation_fraction=1.5"])


def test_int_is_accepted_where_a_float_is_expected():
    assert load_recipe(None, ["train.learning_rate=1"]).train.learning_rate == 1.0


def test_overrides_parse_toml_literals_and_bare_strings():
    recipe = load_recipe(None, ["train.learning_rate=3e-4", "model.n_layer=2", "data.source=peoples-daily",
                                'generate.prompts=["你好", "今天"]', "model.tie_embeddings=false"])
    assert recipe.train.learning_rate == 3e-4 and recipe.model.n_layer == 2
    assert recipe.data.source == "peoples-daily" and recipe.generate.prompts == ["你好", "今天"]
    assert recipe.model.tie_embeddings is False


def test_override_without_equals_is_refused():
    with pytest.raises(LlmkitError, match="expected KEY=VALUE"):
        load_recipe(None, ["train.learning_rate"])


def test_override_beats_file(recipe_file):
    path = recipe_file("[train]\nmax_steps = 10\n")
    assert load_recipe(path, ["train.max_steps=20"]).train.max_steps == 20


def test_extends_merges_tables_and_resolves_paths_per_file(tmp_path, recipe_file):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "corpus.txt").write_text("text\n", encoding="utf-8")
    recipe_file('[data]\nsource = "corpus.txt"\nblock_size = 64\n[train]\nmax_steps = 5\n', "base/base.toml")
    child = recipe_file('extends = "base/base.toml"\n[train]\nlearning_rate = 0.01\n', "child.toml")
    recipe = load_recipe(child)
    assert Path(recipe.data.source) == (tmp_path / "base" / "corpus.txt").resolve()
    assert recipe.data.block_size == 64 and recipe.train.max_steps == 5 and recipe.train.learning_rate == 0.01


def test_extends_cycle_is_refused(recipe_file):
    recipe_file('extends = "b.toml"\n', "a.toml")
    path = recipe_file('extends = "a.toml"\n', "b.toml")
    with pytest.raises(LlmkitError, match="cycle"):
        load_recipe(path)


def test_names_that_are_not_local_files_are_kept(recipe_file):
    recipe = load_recipe(recipe_file('[data]\nsource = "user/dataset"\n[model]\npath = "Qwen/Qwen2.5-0.5B"\n'))
    assert recipe.data.source == "user/dataset" and recipe.model.path == "Qwen/Qwen2.5-0.5B"


def test_missing_recipe_is_a_clear_error():
    with pytest.raises(LlmkitError, match="recipe not found: nope.toml"):
        load_recipe("nope.toml")


def test_invalid_toml_names_the_file(recipe_file):
    with pytest.raises(LlmkitError, match=r"recipe\.toml: not valid TOML"):
        load_recipe(recipe_file("[train\n"))


def test_pretraining_check_block_size_vs_positions():
    from llmkit.settings import check_pretraining

    recipe = load_recipe(None, ["data.block_size=1024", "model.max_positions=512"])  # fine for other commands
    with pytest.raises(LlmkitError, match=r"data.block_size \(1024\) is larger than the model's positions"):
        check_pretraining(recipe)


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe("pretrain-zh-tiny", ["model.n_layer=3"])
    path = tmp_path / "resolved.toml"
    path.write_text(recipe_to_toml(recipe), encoding="utf-8")
    assert load_recipe(path) == recipe


def test_strings_with_line_breaks_quotes_and_dotted_keys_round_trip(tmp_path):
    """What the hand-written TOML writer broke on: a carriage return, and a dotted key in a table value."""
    recipe = load_recipe("eval-ppl", ['generate.stop=["\\r\\n", "\\"x\\"", "a\\\\b"]', "run.name=run\twith-tab",
                                      'distributed.fsdp_config={"a.b" = 1, "c" = ["d"]}'])
    assert recipe.generate.stop == ["\r\n", '"x"', "a\\b"] and recipe.distributed.fsdp_config == {"a.b": 1, "c": ["d"]}
    path = tmp_path / "resolved.toml"
    path.write_text(recipe_to_toml(recipe), encoding="utf-8")
    assert load_recipe(path) == recipe and "[[eval.tasks]]" in path.read_text(encoding="utf-8")


def test_copy_refuses_to_overwrite(tmp_path):
    target = copy_recipe("pretrain-zh-tiny", tmp_path)
    assert target.read_text(encoding="utf-8") == (shipped_recipes_dir() / "pretrain-zh-tiny.toml").read_text(encoding="utf-8")
    with pytest.raises(LlmkitError, match="exists; pass --overwrite"):
        copy_recipe("pretrain-zh-tiny", tmp_path)


def test_choice_outside_literal_suggests_the_closest(recipe_file):
    with pytest.raises(LlmkitError, match=r"finetune.task must be one of .*, got 'clasification' "
                                          r"\(did you mean 'classification'\?\)$"):
        load_recipe(recipe_file('[finetune]\ntask = "clasification"\n'))
    with pytest.raises(LlmkitError, match=r"finetune.method must be one of .*, got 'lroa' \(did you mean 'lora'\?\)$"):
        load_recipe(None, ["finetune.method=lroa"])


def test_missing_shipped_recipe_suggests_the_closest():
    with pytest.raises(LlmkitError, match=r"recipe not found: pretrain-zh-tin \(did you mean 'pretrain-zh-tiny'\?\)"):
        load_recipe("pretrain-zh-tin")


def test_recipe_that_is_not_utf8_names_the_file_and_the_byte(tmp_path):
    path = tmp_path / "latin.toml"
    path.write_bytes('[run]\nname = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(LlmkitError, match=r"latin\.toml: not UTF-8 text \(byte 0xe9 at position 17\)$"):
        load_recipe(path)


def test_an_integer_too_large_for_a_float_is_a_type_error():
    huge = "1" + "0" * 400
    with pytest.raises(LlmkitError, match=r"train.learning_rate must be a number, got 10{400}$"):
        load_recipe(None, [f"train.learning_rate={huge}"])


@pytest.mark.parametrize("override, key", [
    ("train.learning_rate=nan", "train.learning_rate"),
    ("train.adam_beta2=7", "train.adam_beta2"),
    ("finetune.metric=acuracy", "finetune.metric"),
])
def test_cli_recipe_check_refuses_bad_values_in_one_line(tmp_path, override, key):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "llmkit", "recipe", "check", "classify", "--set", override],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key} ") and "Traceback" not in result.stderr
    assert result.stdout == "" and list(tmp_path.iterdir()) == []  # nothing written
