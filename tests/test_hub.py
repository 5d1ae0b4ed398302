"""llmkit push (llmkit/hub.py): what is uploaded and what stays behind, and the refusals made before any request.

No network and no stand-in for huggingface_hub's API: only its HTTP client is replaced. huggingface_hub 2.x
sends every request through one shared httpx2.Client made by a factory (`set_client_factory`); the factory
here gives it an httpx2.MockTransport that answers the few endpoints create_repo, create_branch and
upload_folder call (repository and branch creation, YAML check, preupload, commit) as the hub does, and
records every request, so the tests read what would have reached the hub.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmkit.cli import app
from llmkit.errors import LlmkitError
from llmkit.hub import push, pushed_files
from llmkit.report import Origin, Scores, model_card
from llmkit.rundir import make_owned, write_json

REPO = "someone/tiny-zh"
TOKEN = "hf_test_token"
MODEL = {  # what a pushed run holds and the hub should get
    "config.json": '{"model_type": "llama"}',
    "model.safetensors": "weights",
    "tokenizer.json": "{}",
    "recipe.toml": "[run]\n",
    "metrics.jsonl": '{"step": 1, "loss": 2.0}\n',
    "final_metrics.json": "{}",
}
LEFT_BEHIND = (  # what a run holds that is not the model
    "checkpoints/checkpoint-3/model.safetensors", "checkpoints/checkpoint-3/llmkit-complete.json",
    ".README.md.4242.tmp", "merged/config.json", "merged/model.safetensors", "tokenizer/.vocab.json.7.tmp",
    ".tiny.incoming/config.json",
)


class Hub:
    """The hub's HTTP API, as far as push uses it; `requests` holds (endpoint, path, decoded body,
    authorization header) of each call, in order."""

    ROUTES = (
        ("POST", r"/api/repos/create", "create"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<branch>[^/]+)", "branch"),
        ("POST", r"/api/validate-yaml", "validate"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<revision>[^/]+)", "preupload"),
        ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<revision>[^/]+)", "commit"),
    )

    def __init__(self):
        self.requests: list[tuple[str, str, object, str | None]] = []
        self.refuse: dict[str, int] = {}  # endpoint name -> status to answer with

    def __call__(self, request):
        import httpx2

        body = request.read()
        if request.url.path == "/api/agent-harnesses":  # huggingface_hub's once-a-day user-agent lookup:
            return httpx2.Response(404)  # best effort; unanswered, nothing is cached in HF_HOME
        for method, pattern, name in self.ROUTES:
            match = re.fullmatch(pattern, request.url.path)
            if request.method == method and match:
                content = self.decode(name, body)
                self.requests.append((name, request.url.path, content, request.headers.get("authorization")))
                answer = getattr(self, name)(content, **match.groupdict())
                if name in self.refuse:  # the hub's error bodies carry what its answer would (a 409's url)
                    return httpx2.Response(self.refuse[name], json={"error": f"{name} refused", **answer})
                return httpx2.Response(200, json=answer)
        self.requests.append(("unknown", request.url.path, body, None))
        return httpx2.Response(404, json={"error": f"no such endpoint: {request.method} {request.url.path}"})

    @staticmethod
    def decode(name: str, body: bytes):
        if name == "commit":  # NDJSON: a header line, then one line per file
            return [json.loads(line) for line in body.splitlines()]
        return json.loads(body) if body else None

    def create(self, payload):
        return {"url": f"https://huggingface.co/{payload['organization']}/{payload['name']}"}

    def branch(self, payload, repo, branch):
        return {}

    def validate(self, payload):
        return {"errors": [], "warnings": []}

    def preupload(self, payload, repo, revision):  # every file small: sent in the commit itself, no LFS/xet
        return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                          for f in payload["files"]]}

    def commit(self, lines, repo, revision):
        return {"commitUrl": f"https://huggingface.co/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40}

    def called(self) -> list[str]:
        return [name for name, *_ in self.requests]

    def committed(self) -> dict[str, bytes]:
        """Path -> content of the files of the (single) commit."""
        (lines,) = [content for name, _, content, _ in self.requests if name == "commit"]
        return {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                for line in lines if line["key"] == "file"}


@pytest.fixture
def hub(monkeypatch):
    """huggingface_hub's shared HTTP client, with the hub replaced by Hub (tests run offline otherwise:
    conftest sets HF_HUB_OFFLINE, which the client's request hook enforces)."""
    import httpx2
    from huggingface_hub import constants, set_client_factory
    from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    stand_in = Hub()
    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(stand_in), follow_redirects=True,
                                             event_hooks={"request": [hf_request_event_hook]}))
    yield stand_in
    set_client_factory(default_client_factory)


@pytest.fixture
def run(tmp_path) -> Path:
    """A run folder as llmkit leaves it: the model, its card and reports, and what is not the model."""
    folder = tmp_path / "runs" / "tiny"
    make_owned(folder, "run")
    for name, text in MODEL.items():
        (folder / name).write_text(text, encoding="utf-8")
    for name in LEFT_BEHIND:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("not the model", encoding="utf-8")
    write_json(folder / "merged" / ".llmkit-output", {"made_by": "llmkit"})
    card = model_card("tiny", Origin("causal-lm", training=("peoples-daily",), tags=("pretrain",)),
                      [Scores("peoples-daily", "validation", {"eval_loss": 2.5})], ["# tiny"])
    (folder / "README.md").write_text(card, encoding="utf-8")
    return folder


def expected_files() -> set[str]:
    return {*MODEL, "README.md"}


def test_push_uploads_the_model_and_its_card_and_nothing_else(hub, run):
    pushed = push(run, REPO, token=TOKEN)
    assert hub.called() == ["create", "validate", "preupload", "commit"]
    committed = hub.committed()
    assert set(committed) == expected_files() == set(pushed.files)
    assert committed["model.safetensors"] == b"weights"
    assert committed["README.md"] == (run / "README.md").read_bytes()
    preuploaded = {f["path"] for name, _, content, _ in hub.requests if name == "preupload" for f in content["files"]}
    assert preuploaded == expected_files()  # what stays behind is not even announced
    assert pushed.url == f"https://huggingface.co/{REPO}/commit/{'0' * 40}"
    assert all(auth == f"Bearer {TOKEN}" for *_, auth in hub.requests)
    assert "library_name: transformers" in hub.requests[1][2]["content"]  # the card's YAML went to the check


def test_the_repository_is_made_public_by_default_private_if_asked(hub, run):
    push(run, REPO, token=TOKEN)
    push(run, REPO, token=TOKEN, private=True)
    created = [content for name, _, content, _ in hub.requests if name == "create"]
    assert created[0] == {"name": "tiny-zh", "organization": "someone"}  # the hub's default (public)
    assert created[1] == {"name": "tiny-zh", "organization": "someone", "visibility": "private"}


def test_a_revision_is_a_branch_made_if_absent_and_committed_to(hub, run):
    push(run, REPO, token=TOKEN, revision="v1")
    assert hub.called() == ["create", "branch", "validate", "preupload", "commit"]
    paths = dict((name, path) for name, path, *_ in hub.requests)
    assert paths["branch"] == f"/api/models/{REPO}/branch/v1"
    assert paths["commit"] == f"/api/models/{REPO}/commit/v1"


def test_an_existing_repository_is_pushed_to(hub, run):
    hub.refuse["create"] = 409  # "You already created this model repo"
    push(run, REPO, token=TOKEN)
    assert set(hub.committed()) == expected_files()


def test_a_refused_token_is_one_line_saying_how_to_log_in(hub, run):
    hub.refuse["create"] = 401
    with pytest.raises(LlmkitError, match=r"refused the token \(401\).*HF_TOKEN.*hf auth login"):
        push(run, REPO, token=TOKEN)
    assert hub.called()[0] == "create" and "commit" not in hub.called()  # (then create_repo asks if it exists)


def test_a_folder_that_is_not_a_model_is_refused_before_any_request(hub, run):
    (run / "config.json").unlink()
    with pytest.raises(LlmkitError, match=r"not a model \(no config.json or adapter_config.json\) \(a run "
                                          r"without its final model\?\)"):
        push(run, REPO, token=TOKEN)
    with pytest.raises(LlmkitError, match="no such folder"):
        push(run / "missing", REPO, token=TOKEN)
    assert hub.requests == []


def test_an_adapter_folder_is_a_model(run):
    (run / "config.json").rename(run / "adapter_config.json")
    assert "adapter_config.json" in pushed_files(run)


def test_no_token_is_refused_before_any_request_naming_hf_token(hub, run, monkeypatch, tmp_path):
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(LlmkitError, match=r"^no Hugging Face token: pass --token, set HF_TOKEN, or log in once "
                                          r"with `hf auth login`"):
        push(run, REPO)
    assert hub.requests == []


def test_a_bad_repository_name_is_refused_before_any_request(hub, run):
    with pytest.raises(LlmkitError, match="not a hub repository name"):
        push(run, "a/b/c", token=TOKEN)
    assert hub.requests == []


def test_the_command_pushes_and_says_where(hub, run):
    result = CliRunner().invoke(app, ["push", str(run), REPO, "--token", TOKEN])
    assert result.exit_code == 0, result.output
    assert f"pushed {len(expected_files())} files of {run} to https://huggingface.co/{REPO}/commit/" in result.stdout


def test_the_command_refuses_a_non_model_in_one_line_exit_2(hub, tmp_path):
    result = CliRunner().invoke(app, ["push", str(tmp_path), REPO, "--token", TOKEN])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path}: not a model (no config.json or "
                                                  "adapter_config.json); push a run, a quantized or a merged "
                                                  "model folder"]
    assert hub.requests == []
