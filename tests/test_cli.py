import subprocess
import sys

from typer.testing import CliRunner

from llmkit.cli import app

runner = CliRunner()


def test_help_is_fast_and_imports_no_heavy_library():
    code = ("import sys, time; t = time.perf_counter(); import llmkit.cli; "
            "heavy = [m for m in ('torch', 'transformers', 'datasets', 'peft') if m in sys.modules]; "
            "print(heavy, time.perf_counter() - t)")
    heavy, seconds = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True).stdout.rsplit(" ", 1)
    assert heavy == "[]" and float(seconds) < 1.0


def test_python_dash_m_answers_help():
    result = subprocess.run([sys.executable, "-m", "llmkit", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "pretrain" in result.stdout


def test_bad_override_is_one_line_exit_2_without_traceback():
    result = runner.invoke(app, ["recipe", "check", "pretrain-zh-tiny", "--set", "train.max_stpes=3"])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: --set train.max_stpes=3: unknown key 'train.max_stpes' "
                                     "(did you mean 'train.max_steps'?)")
    assert "Traceback" not in result.output


def test_debug_shows_the_traceback():
    result = runner.invoke(app, ["--debug", "recipe", "check", "missing.toml"])
    assert result.exit_code != 0 and isinstance(result.exception, Exception)


def test_missing_recipe_exits_2():
    result = runner.invoke(app, ["pretrain", "no/such/recipe.toml"])
    assert result.exit_code == 2 and "recipe not found: no/such/recipe.toml" in result.stderr


def test_finetune_of_a_missing_recipe_exits_2():
    result = runner.invoke(app, ["finetune", "no/such/recipe.toml"])
    assert result.exit_code == 2 and "recipe not found" in result.stderr


def test_recipe_list_shows_shipped_recipes_with_summaries():
    result = runner.invoke(app, ["recipe", "list"])
    assert result.exit_code == 0 and "pretrain-zh-tiny" in result.stdout and "Quickstart" in result.stdout


def test_recipe_show_applies_overrides():
    result = runner.invoke(app, ["recipe", "show", "pretrain-zh-tiny", "--set", "model.n_layer=7", "--json"])
    assert result.exit_code == 0 and '"n_layer": 7' in result.stdout


def test_recipe_copy_then_check(tmp_path):
    assert runner.invoke(app, ["recipe", "copy", "pretrain-zh-tiny", str(tmp_path)]).exit_code == 0
    result = runner.invoke(app, ["recipe", "check", str(tmp_path / "pretrain-zh-tiny.toml")])
    assert result.exit_code == 0 and result.stdout.strip().endswith(": ok")


def test_version_is_printed_without_a_command():
    from llmkit import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"llmkit {__version__}\n"


def test_recipe_keys_lists_every_key_with_type_default_and_its_comment():
    import dataclasses
    import json

    from llmkit.settings import Recipe

    result = runner.invoke(app, ["recipe", "keys", "--json"])
    assert result.exit_code == 0, result.output
    keys = {key["name"]: key for key in json.loads(result.stdout)}
    leaves = {f"{table.name}.{field.name}" for table in dataclasses.fields(Recipe)
              for field in dataclasses.fields(table.default_factory()) if field.name not in ("tasks", "task")}
    assert leaves <= set(keys) and "eval.tasks[].kind" in keys and "quantize.task.source" in keys
    assert all(key["comment"] for key in keys.values())
    assert keys["train.learning_rate"] == {"name": "train.learning_rate", "type": "float", "default": 0.001,
                                           "comment": "peak learning rate, after warm-up"}
    assert keys["generate.temperature"]["type"] == "float or unset" and keys["generate.temperature"]["default"] is None
    assert keys["finetune.task"]["type"].startswith("'classification' | 'token-classification'")
    one_table = runner.invoke(app, ["recipe", "keys", "distill"])
    assert one_table.exit_code == 0 and "distill.temperature" in one_table.stdout and "train." not in one_table.stdout
    wrong = runner.invoke(app, ["recipe", "keys", "trian"])
    assert wrong.exit_code == 2 and "no recipe table [trian] (did you mean 'train'?)" in wrong.stderr
