"""resolve_model: a local-looking name that is not there is an error, never a hub download attempt."""

import pytest

from llmkit.errors import LlmkitError
from llmkit.models import resolve_model
from llmkit.recipe import looks_local


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working folder with a runs/ folder in it, and a home of its own."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "runs").mkdir()
    return tmp_path


@pytest.mark.parametrize("name", ["runs/nothing", "./nothing", "../nothing", "/nothing/at/all", "~/nothing",
                                  "a/b/c", "owner/..", "owner/", "/owner"])
def test_a_local_looking_model_that_is_not_there_is_refused(workdir, name):
    with pytest.raises(LlmkitError, match=rf"^model not found: {name} \(no such folder\)$"):
        resolve_model(name)


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-0.5B", "gpt2", "nothing/here"])
def test_hub_ids_are_kept(workdir, name):
    assert resolve_model(name) == name


def test_runs_slash_name_is_a_hub_id_only_while_no_runs_folder_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_local("runs/x")
    (tmp_path / "runs").mkdir()
    assert looks_local("runs/x")


def test_an_existing_model_folder_is_returned_and_one_without_a_config_refused(workdir):
    (workdir / "runs" / "model").mkdir()
    with pytest.raises(LlmkitError, match=r"runs/model: not a model \(no config.json"):
        resolve_model("runs/model")
    (workdir / "runs" / "model" / "config.json").write_text("{}", encoding="utf-8")
    assert resolve_model("runs/model") == "runs/model"


def test_finetune_with_a_missing_model_path_stops_before_the_hub_and_the_disk(workdir, monkeypatch):
    """model.path goes through resolve_model: refused before any download attempt or run folder."""
    import json

    import huggingface_hub

    from llmkit import finetune
    from llmkit.recipe import load_recipe

    def no_hub(*args, **kwargs):
        raise AssertionError("tried the hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    rows = [{"text": f"review {i}", "label": ["good", "bad"][i % 2]} for i in range(20)]
    (workdir / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    recipe = load_recipe("classify", ["model.path=runs/pretrain-zh-tiny", f"finetune.source={workdir / 'rows.jsonl'}",
                                      'finetune.test_source=""'])
    with pytest.raises(LlmkitError, match=r"^model not found: runs/pretrain-zh-tiny \(no such folder\)$"):
        finetune.run(recipe)
    assert not (workdir / "runs" / "classify").exists()
