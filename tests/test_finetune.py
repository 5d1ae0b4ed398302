"""llmkit finetune on a tiny Llama base: every task x method trains (the trained parameters move, the loss
falls, QLoRA's base is 4-bit) and reloads, merged adapters (also by `--merge`), text pairs, labels, bad input
through the CLI, class weights, distillation, epochs, early stopping, best checkpoint, resume. Covers
llmkit/finetune.py and the PEFT glue it uses, llmkit/adapters.py."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback
from typer.testing import CliRunner

from llmkit import finetune, load_recipe
from llmkit.cli import app
from llmkit.corpora import peoples_daily
from llmkit import tasks
from llmkit.training import LlmkitTrainer
from llmkit.settings import DistillSettings, FinetuneSettings
from llmkit.rundir import latest_name
from llmkit.task_data import TaskData
from tests.conftest import char_tokenizer, save_tiny_model, interrupted_at

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
TASKS = ["classification", "token-classification", "extractive-qa", "causal-lm"]
METHODS = ["full", "lora", "dora", "qlora", "prompt-tuning", "prefix-tuning"]
# One pair per task reloads in a new Python process (importing peft there costs ~10 s, so not all 24):
# the ones most likely to depend on state of the training process.
NEW_PROCESS = {
    ("classification", "qlora"),  # 4-bit base at training; the adapter reloads onto the fp32 base
    ("token-classification", "prompt-tuning"),  # virtual tokens ahead of the tags
    ("extractive-qa", "lora"),  # LlamaForQuestionAnswering names its backbone "transformer", the base "model"
    ("causal-lm", "prefix-tuning"),  # generation through PEFT's past key values
}
TAGS = ["O", "B-PER", "I-PER"]
ADAPTER_PARAMETERS = {  # method -> what its trained parameters' names contain (PEFT's names)
    "lora": ["lora_A", "lora_B"], "qlora": ["lora_A", "lora_B"], "dora": ["lora_A", "lora_B", "lora_magnitude_vector"],
    "prompt-tuning": ["prompt_encoder"], "prefix-tuning": ["prompt_encoder"]}


pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def task_rows(task: str, texts: list[str]) -> list[dict]:
    if task == "classification":  # the label follows the length: learnable, both labels in any sample
        return [{"text": t[:8 + i % 12], "label": "long" if 8 + i % 12 >= 14 else "short"} for i, t in enumerate(texts)]
    if task == "token-classification":
        return [{"tokens": list(t[:12]), "tags": ["B-PER", "I-PER"] + ["O"] * 10} for t in texts]
    if task == "extractive-qa":
        return [{"context": t[:20], "question": "哪两个字？", "answers": {"text": [t[2:4]], "answer_start": [2]}}
                for t in texts]
    return [{"prompt": t[:8], "response": t[8:12]} for t in texts]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random LlamaForCausalLM (d_model 32, 2 layers) with a character tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("base") / "model", "LlamaForCausalLM", char_tokenizer())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """task -> training file (48 rows) and "task:test" -> test file (4 rows: causal-lm scoring generates)."""
    folder = tmp_path_factory.mktemp("data")
    texts = [row["text"] for row in peoples_daily() if len(row["text"]) >= 24][:52]
    files = {}
    for task in TASKS:
        files[task] = write_jsonl(folder / f"{task}.jsonl", task_rows(task, texts[:48]))
        files[f"{task}:test"] = write_jsonl(folder / f"{task}-test.jsonl", task_rows(task, texts[48:]))
    return files


def overrides(base, data, output_dir, name, task="classification", method="full", *more) -> list[str]:
    # fp32: these tests compare trained, reloaded and recomputed outputs to 1e-4 and closer; `auto` trains
    # in bf16 on CPUs with native bf16 (llmkit.devices, tested on its own).
    return [f"finetune.task={task}", f"finetune.method={method}", f"finetune.source={data[task]}",
            f"finetune.test_source={data[task + ':test']}", f"model.path={base}", "finetune.max_length=48",
            "finetune.num_virtual_tokens=4", "train.max_steps=2", "train.batch_size=8", "train.eval_every=2",
            "train.log_every=1", "train.eval_batch_size=16", "train.learning_rate=1e-3", "train.warmup_steps=0",
            "train.precision=fp32", f"run.output_dir={output_dir}", f"run.name={name}", *more]


def train(base, data, tmp_path, task="classification", method="full", *more, name="ft", **kwargs):
    recipe = load_recipe(None, overrides(base, data, tmp_path / "runs", name, task, method, *more))
    return finetune.run(recipe, **kwargs)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class Watch(TrainerCallback):
    """What training did: the parameters, the base's linear layers and the loss on the training set when
    training begins and when it ends (after the Trainer loaded the kept checkpoint back), and that model."""

    model = None

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        rows = [train_dataloader.dataset[i] for i in range(len(train_dataloader.dataset))]
        self.batches = [train_dataloader.collate_fn(rows[i:i + 16]) for i in range(0, len(rows), 16)]
        self.begin = self.look(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            self.training_linears = linear_layers(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model
        self.end = self.look(model)

    def look(self, model) -> dict:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            losses = [model(**{k: v.to(model.device) for k, v in batch.items()}).loss.item() * len(batch["input_ids"])
                      for batch in self.batches]
        model.train(was_training)
        return {"loss": sum(losses) / sum(len(batch["input_ids"]) for batch in self.batches),
                "parameters": {name: p.detach().clone() for name, p in model.named_parameters()},
                "trainable": {name for name, p in model.named_parameters() if p.requires_grad},
                "linears": linear_layers(model)}


def linear_layers(model) -> dict:
    """The base model's linear layers (not the adapter's, not the task heads): name -> the layer."""
    from llmkit.adapters import HEAD_MODULES

    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and "lora_" not in name
            and not any(head in name.split(".") for head in [*HEAD_MODULES, "lm_head"])}


def assert_4bit_nf4(linears: dict) -> None:
    """Every linear layer that bitsandbytes' 4-bit kernels take (input width a multiple of 64, output of 32)
    is an NF4 Linear4bit."""
    import bitsandbytes as bnb

    wide = {name: layer for name, layer in linears.items() if layer.in_features % 64 == 0 and layer.out_features % 32 == 0}
    assert wide, "no layer is wide enough for 4 bits: the check would prove nothing"
    for name, layer in wide.items():
        assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_type == "nf4", (name, layer)


def probe(model, tokenizer, task: str) -> dict:
    """The model's outputs on one fixed input (and, for causal LMs, 3 greedy tokens)."""
    model.eval()
    if task == "token-classification":
        encoded = tokenizer([list("北京是中国的首都")], is_split_into_words=True, return_tensors="pt")
    elif task == "extractive-qa":
        encoded = tokenizer(["哪里？"], ["北京是中国的首都"], return_tensors="pt")
    else:
        text = "问：今天天气答：" if task == "causal-lm" else "今天天气很好"
        encoded = tokenizer([text], return_tensors="pt")
    inputs = {key: encoded[key] for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        output = model(**inputs)
        logits = torch.stack([output.start_logits, output.end_logits]) if task == "extractive-qa" else output.logits
        report = {"input_length": inputs["input_ids"].shape[1], "logits": logits.float().tolist(),
                  "id2label": {str(k): v for k, v in model.config.id2label.items()}}
        if task == "causal-lm":
            new = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[0, inputs["input_ids"].shape[1]:]
            report["text"] = tokenizer.decode(new)
            report["new_tokens"] = len(new)
    return report


def reload_and_probe(run_dir: str, task: str) -> dict:
    """Load a run as every command does (llmkit.loading.load_model) and probe it; in fp32, the precision it
    was trained in (`auto` would load it in bf16 on a GPU)."""
    from llmkit.loading import load_model

    model, tokenizer = load_model(run_dir, head=tasks.TASKS[task].head, dtype="float32")
    return probe(model, tokenizer, task)


def reload_in_new_process(run_dir: Path, task: str) -> dict:
    code = ("import json, sys; from tests.test_finetune import reload_and_probe; "
            "print(json.dumps(reload_and_probe(sys.argv[1], sys.argv[2])))")
    result = subprocess.run([sys.executable, "-c", code, str(run_dir), task], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def trained_adapter_on_fp32_base(recipe, trained):
    """The trained (QLoRA) adapter weights on the full-precision base the run reloads onto."""
    import copy

    import peft

    from llmkit.finetune import task_tokenizer
    from llmkit.loading import build_task_model
    from llmkit.task_data import load_task_data

    data = load_task_data(recipe.finetune, recipe.run.seed)
    model = build_task_model(recipe, task_tokenizer(recipe, [(recipe.finetune, data)]), data.labels, quantize=False)
    model = peft.get_peft_model(model, copy.deepcopy(trained.peft_config["default"]))
    peft.set_peft_model_state_dict(model, peft.get_peft_model_state_dict(trained))
    return model


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("task", TASKS)
def test_every_task_and_method_trains_and_the_run_reloads_and_predicts(base, data, tmp_path, task, method):
    from llmkit.tokenizer import load_tokenizer

    watch = Watch()
    # One batch holds the whole training set (43 rows): each step follows the full gradient, so the loss over
    # the training set falls for every method (a step on 8 rows need not lower it: prefix tuning's did not).
    recipe = load_recipe(None, overrides(base, data, tmp_path / "runs", "ft", task, method, "train.batch_size=48"))
    result = finetune.run(recipe, callbacks=[watch])
    assert result.test_metrics and result.validation_metrics
    # The run is the newest model of its head; only a causal LM becomes what `generate` runs by default.
    head = tasks.TASKS[task].head
    assert (tmp_path / "runs" / latest_name(head)).resolve() == result.run_dir.resolve()
    assert (tmp_path / "runs" / "latest").exists() == (head == "causal-lm")
    # Training moved exactly what it trains (everything, or the adapter and the new head, leaving the base
    # frozen) and lowered the loss over the training set.
    begin, end = watch.begin, watch.end
    changed = {name for name, value in begin["parameters"].items() if not torch.equal(value, end["parameters"][name])}
    assert changed == begin["trainable"]
    if method == "full":
        assert changed == set(begin["parameters"])
    else:
        assert all(any(key in name for name in changed) for key in ADAPTER_PARAMETERS[method])
        assert all(any(key in name for key in [*ADAPTER_PARAMETERS[method], "modules_to_save"]) for name in changed)
    assert end["loss"] < begin["loss"]
    if method == "qlora":  # trained on a 4-bit base, which stays 4-bit when the Trainer loads the kept checkpoint
        assert_4bit_nf4(watch.training_linears)
        assert_4bit_nf4(end["linears"])
    # The reference: the trained model as it left training. QLoRA trained on a 4-bit base and reloads
    # onto the fp32 base (they differ by quantization error, as much as the logits of this tiny model):
    # its reference is the trained adapter on the fp32 base.
    trained = trained_adapter_on_fp32_base(recipe, watch.model) if method == "qlora" else watch.model
    expected = probe(trained, load_tokenizer(str(result.run_dir)), task)
    if (task, method) in NEW_PROCESS:
        reloaded = reload_in_new_process(result.run_dir, task)
    else:
        reloaded = reload_and_probe(str(result.run_dir), task)

    virtual = 4 if method == "prompt-tuning" else 0
    length = reloaded["input_length"] + virtual
    shape = {"classification": [1, 2], "token-classification": [1, length, len(TAGS)],
             "extractive-qa": [2, 1, length], "causal-lm": [1, length, len(char_tokenizer())]}[task]
    assert list(torch.tensor(reloaded["logits"]).shape) == shape
    # LoRA/DoRA are merged into the base on loading: equal up to float rounding.
    torch.testing.assert_close(torch.tensor(reloaded["logits"]), torch.tensor(expected["logits"]),
                               atol=1e-4, rtol=0)
    if task == "classification":
        assert reloaded["id2label"] == {"0": "long", "1": "short"}
    if task == "token-classification":
        assert reloaded["id2label"] == dict(zip("012", TAGS))
    if task == "causal-lm":
        assert reloaded["new_tokens"] == 3 and reloaded["text"]


def assert_merged_equals_base_plus_adapter(run_dir: Path, base: Path) -> None:
    """<run>/merged loads with plain transformers, predicts as the adapter on its full-precision base (for
    QLoRA too: the run's config.json carries no quantization), and holds the adapter in its weights: every
    matrix LoRA adapted differs from the base's."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    merged_dir = run_dir / "merged"
    assert (merged_dir / "config.json").is_file() and not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    config = AutoConfig.from_pretrained(run_dir)
    base_weights = AutoModelForSequenceClassification.from_pretrained(base, config=config).state_dict()
    adapted = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, config=config),
                                        run_dir).eval()
    inputs = tokenizer(["今天天气很好", "北京是中国的首都", "好"], padding=True, return_tensors="pt")
    inputs.pop("token_type_ids", None)
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapted(**inputs).logits, atol=1e-4, rtol=0)
    assert merged.config.id2label == {0: "long", 1: "short"}
    adapted_matrices = [name for name in merged.state_dict() if name.endswith("_proj.weight")]
    assert len(adapted_matrices) == 14  # 2 layers x q, k, v, o, gate, up, down
    for name in adapted_matrices:
        assert (merged.state_dict()[name] - base_weights[name]).abs().max().item() > 1e-4, name


@pytest.fixture(scope="module")
def wide_base(tmp_path_factory) -> Path:
    """The base at d_model 64: bitsandbytes' 4-bit kernels take all its linear layers (QLoRA)."""
    return save_tiny_model(tmp_path_factory.mktemp("wide") / "model", "LlamaForCausalLM", char_tokenizer(), d_model=64)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_merged_adapter_equals_base_plus_adapter_and_loads_with_plain_transformers(
        base, wide_base, data, tmp_path, method):
    model = wide_base if method == "qlora" else base
    watch = Watch()
    result = train(model, data, tmp_path, "classification", method, "finetune.merge=true", callbacks=[watch])
    if method == "qlora":  # the adapter trained on a 4-bit NF4 base (all 14 layers: 64 wide and more)
        assert len(watch.training_linears) == 14
        assert_4bit_nf4(watch.training_linears)
    assert_merged_equals_base_plus_adapter(result.run_dir, model)


@pytest.mark.slow
def test_merge_flag_of_the_cli_saves_base_plus_adapter_merged(recipe_file, tmp_path, base, data):
    result = invoke_finetune(recipe_file, tmp_path, base, data,
                             ["finetune.method=lora", "train.max_steps=2", "train.eval_every=2",
                              "train.warmup_steps=0"], "--merge")
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "ft"
    assert_merged_equals_base_plus_adapter(run_dir, base)


@pytest.mark.slow
def test_text_pairs_are_classified_by_their_second_text(base, data, tmp_path):
    # The first text is the same in every row: only the pair text (好 or 差, after it) tells the label.
    rows = [{"text": "这句话怎么样？", "pair": ("好" if i % 2 else "差") * (1 + i % 3), "label": "good" if i % 2 else "bad"}
            for i in range(48)]
    data = {**data, "classification": write_jsonl(tmp_path / "pairs.jsonl", rows),
            "classification:test": write_jsonl(tmp_path / "pairs-test.jsonl", rows[:8])}
    result = train(base, data, tmp_path, "classification", "full", "finetune.text_pair_column=pair",
                   "train.max_steps=6", "train.eval_every=6", "train.learning_rate=1e-2")
    assert result.validation_metrics["accuracy"] == 1.0 and result.test_metrics["accuracy"] == 1.0


@pytest.mark.slow
def test_classifier_labels_are_sorted_unless_the_recipe_orders_them(base, data, tmp_path):
    texts = ["今天天气很好", "经济发展迅速", "人民生活改善", "北京是首都"] * 6
    rows = [{"text": text, "label": label} for text, label in zip(texts, ["neutral", "positive", "negative"] * 8)]
    source = write_jsonl(tmp_path / "three.jsonl", rows)
    data = {**data, "classification": source, "classification:test": source}
    sorted_run = train(base, data, tmp_path, "classification", "full", "train.max_steps=1", name="sorted")
    config = json.loads((sorted_run.run_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    ordered_run = train(base, data, tmp_path, "classification", "full", "train.max_steps=1",
                        'finetune.labels=["positive", "negative", "neutral"]', name="ordered")
    config = json.loads((ordered_run.run_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "positive", "1": "negative", "2": "neutral"}
    assert config["label2id"] == {"positive": 0, "negative": 1, "neutral": 2}


# ---------------------------------------------------------------- bad input through the CLI


def bad_input_case(case: str, tmp_path: Path, base: Path, data: dict) -> tuple[list[str], str]:
    """(--set overrides, the message expected) for one kind of bad input."""
    good = read_jsonl(data["classification"])
    if case == "missing label":
        rows = good[:2] + [{"text": "没有标签"}] + good[2:]
        path = write_jsonl(tmp_path / "no-label.jsonl", rows)
        return [f"finetune.source={path}"], f"{path}:3: expected a 'label' field"
    if case == "mixed label types":
        path = write_jsonl(tmp_path / "mixed.jsonl", good + [{"text": "数字标签", "label": 1}])
        return [f"finetune.source={path}"], \
            f"finetune.source {path}: labels must be all text or all integers, found int, str"
    if case == "unseen test label":
        path = write_jsonl(tmp_path / "test.jsonl", good[:3] + [{"text": "中性", "label": "neutral"}])
        return [f"finetune.test_source={path}"], \
            f"{path} (test split): label 'neutral' never appears in the training data"
    if case == "answer not in context":
        rows = read_jsonl(data["extractive-qa"])
        rows[1]["answers"] = {"text": ["不在这里"], "answer_start": [0]}
        path = write_jsonl(tmp_path / "qa.jsonl", rows)
        return ["finetune.task=extractive-qa", f"finetune.source={path}", f"finetune.test_source={path}"], \
            f"{path}: row 2: the answer '不在这里' is not in its context at answer_start 0"
    if case == "tags not one per token":
        rows = read_jsonl(data["token-classification"])
        rows[1]["tags"] = rows[1]["tags"][:-1]
        path = write_jsonl(tmp_path / "tags.jsonl", rows)
        return ["finetune.task=token-classification", f"finetune.source={path}", f"finetune.test_source={path}"], \
            f"{path}: row 2: expected a list 'tags' with one tag per token of 'tokens' (12 tokens, 11 tags)"
    if case == "distillation of extractive-qa":
        qa = data["extractive-qa"]
        return ["finetune.task=extractive-qa", f"finetune.source={qa}", f"finetune.test_source={qa}",
                f"distill.teacher={base}"], "distill.teacher: distillation covers classification, token-classification"
    if case == "no head for the task":
        import transformers

        tokenizer = char_tokenizer()
        phi = tmp_path / "phi"
        config = transformers.PhiConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, pad_token_id=tokenizer.pad_token_id)
        transformers.PhiForCausalLM(config).save_pretrained(phi)
        tokenizer.save_pretrained(phi)
        assert "phi" not in transformers.models.auto.modeling_auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES
        qa = [data["extractive-qa"]] * 2
        return ["finetune.task=extractive-qa", f"finetune.source={qa[0]}", f"finetune.test_source={qa[1]}",
                f"model.path={phi}"], f"{phi}: transformers has no question-answering head for this architecture"
    if case == "adapter without model.path":
        return ["finetune.method=lora", 'model.path=""'], \
            'finetune.method = "lora" trains an adapter on a base model: set model.path'
    if case == "merge with full tuning":
        return ["finetune.merge=true"], 'finetune.merge needs an adapter method (lora, dora, qlora), not "full"'
    raise AssertionError(case)


def invoke_finetune(recipe_file, tmp_path, base, data, sets, *options):
    recipe = recipe_file("\n".join(["[run]", 'name = "ft"', f"output_dir = {json.dumps(str(tmp_path / 'runs'))}",
                                    "[finetune]", f"source = {json.dumps(data['classification'])}",
                                    f"test_source = {json.dumps(data['classification:test'])}", "max_length = 48",
                                    "[model]", f"path = {json.dumps(str(base))}",
                                    "[train]", "max_steps = 1", "eval_every = 1", "batch_size = 8",
                                    "eval_batch_size = 16"]) + "\n")
    return runner.invoke(app, ["finetune", str(recipe), *[arg for s in sets for arg in ("--set", s)], *options])


@pytest.mark.parametrize("case", ["missing label", "mixed label types", "unseen test label", "answer not in context",
                                  "tags not one per token", "no head for the task", "adapter without model.path",
                                  "merge with full tuning", "distillation of extractive-qa"])
def test_bad_input_exits_2_with_one_line_naming_the_file_or_key_and_writes_nothing(
        recipe_file, tmp_path, base, data, case):
    sets, message = bad_input_case(case, tmp_path, base, data)
    result = invoke_finetune(recipe_file, tmp_path, base, data, sets)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_existing_run_is_refused_without_overwrite_and_left_untouched(recipe_file, tmp_path, base, data):
    run_dir = tmp_path / "runs" / "ft"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "model.safetensors").write_bytes(b"weights of an earlier run")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n', encoding="utf-8")
    before = snapshot(tmp_path / "runs")
    result = invoke_finetune(recipe_file, tmp_path, base, data, [])
    assert result.exit_code == 2
    assert f"{run_dir} exists; pass --overwrite to replace it" in result.stderr
    assert snapshot(tmp_path / "runs") == before


@pytest.mark.slow
def test_truncation_is_reported(recipe_file, tmp_path, base, data):
    result = invoke_finetune(recipe_file, tmp_path, base, data, ["finetune.max_length=8"])
    assert result.exit_code == 0, result.output
    assert re.search(r"\d+ of \d+ training examples are longer than finetune.max_length = 8 tokens and were "
                     r"truncated", result.stderr)
    assert re.search(r"\d+ of \d+ validation examples are longer than finetune.max_length = 8", result.stderr)


# ---------------------------------------------------------------- losses


def tiny_classifier(vocab_size: int, layers: int = 1, seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=2, pad_token_id=3)
    return LlamaForSequenceClassification(config).eval()


def bare_trainer(**attributes) -> LlmkitTrainer:
    """An LlmkitTrainer with only the attributes its losses read."""
    trainer = LlmkitTrainer.__new__(LlmkitTrainer)
    vars(trainer).update(attributes)
    return trainer


def test_balanced_class_weights_weigh_the_cross_entropy():
    import torch.nn.functional as F

    settings = FinetuneSettings(class_weights="balanced")
    rows = [{"text": "多", "label": "many"}] * 3 + [{"text": "少", "label": "few"}]
    weights = finetune.class_weights(settings, TaskData(rows, [], [], labels=["few", "many"]))
    assert weights.tolist() == pytest.approx([4 / (2 * 1), 4 / (2 * 3)])  # total / (classes x count)
    assert finetune.class_weights(FinetuneSettings(), TaskData(rows, [], [], labels=["few", "many"])) is None

    model = tiny_classifier(50)
    torch.manual_seed(1)
    inputs = {"input_ids": torch.randint(4, 50, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
              "labels": torch.tensor([1, 1, 1, 0])}
    loss = bare_trainer(class_weights=weights, teacher=None, distill=None).compute_loss(model, inputs)
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    assert loss.item() == pytest.approx(F.cross_entropy(logits, inputs["labels"], weight=weights).item(), rel=1e-5)
    assert loss.item() != pytest.approx(F.cross_entropy(logits, inputs["labels"]).item(), rel=1e-3)


@pytest.fixture(scope="module")
def teacher(base, data, tmp_path_factory) -> Path:
    """A trained tiny classifier run (full tuning of the base: it reads the base's tokens)."""
    recipe = load_recipe(None, overrides(base, data, tmp_path_factory.mktemp("teacher"), "teacher"))
    return finetune.run(recipe).run_dir


@pytest.mark.slow
def test_distillation_loss_at_alpha_1_is_t2_times_kl_from_the_teacher(teacher):
    import torch.nn.functional as F

    from llmkit.loading import load_model

    teacher_model, tokenizer = load_model(str(teacher), head="sequence-classification")
    tokenizer.padding_side = "right"
    student = tiny_classifier(len(tokenizer), seed=3)
    encoded = tokenizer(["今天天气很好", "北京是中国的首都", "好"], padding=True, return_tensors="pt")
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"],
              "labels": torch.tensor([0, 1, 1])}
    distill = DistillSettings(teacher=str(teacher), temperature=2.0, alpha=1.0)
    loss = bare_trainer(class_weights=None, teacher=teacher_model, distill=distill,
                        perplexity=False).compute_loss(student, inputs)

    model_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        p_teacher = F.softmax(teacher_model(**model_inputs).logits.double() / 2.0, -1)
        log_p_student = F.log_softmax(student(**model_inputs).logits.double() / 2.0, -1)
    kl = (p_teacher * (p_teacher.log() - log_p_student)).sum(-1).mean()  # per example, averaged
    assert loss.item() == pytest.approx(2.0 ** 2 * kl.item(), rel=1e-4)
    assert loss.requires_grad


@pytest.mark.parametrize("task", ["token-classification", "causal-lm"])
def test_token_level_distillation_averages_the_kl_over_the_positions_that_carry_a_label(task):
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForTokenClassification

    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=3, pad_token_id=3)
    model_class = LlamaForTokenClassification if task == "token-classification" else LlamaForCausalLM
    torch.manual_seed(0)
    teacher, student = model_class(config).eval(), model_class(config).eval()
    input_ids = torch.randint(4, 50, (2, 7))
    labels = torch.full((2, 7), -100)
    if task == "token-classification":
        labels[:, [1, 3, 4]] = torch.tensor([2, 0, 1])  # tags on first sub-tokens
        positions = [1, 3, 4]  # a tagger's output at a token is that token's tag
    else:
        labels[:, 4:] = input_ids[:, 4:]  # the response: the last 3 tokens
        positions = [3, 4, 5]  # a causal LM's output at i predicts token i + 1
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    distill = DistillSettings(teacher="teacher", temperature=2.0, alpha=1.0)
    loss = bare_trainer(class_weights=None, teacher=teacher, distill=distill,
                        perplexity=task == "causal-lm").compute_loss(student, inputs)
    with torch.no_grad():
        p_teacher = F.softmax(teacher(input_ids=input_ids).logits[:, positions].double() / 2.0, -1)
        log_p_student = F.log_softmax(student(input_ids=input_ids).logits[:, positions].double() / 2.0, -1)
    kl = (p_teacher * (p_teacher.log() - log_p_student)).sum(-1).mean()  # per labelled position, averaged
    assert loss.item() == pytest.approx(2.0 ** 2 * kl.item(), rel=1e-4)


@pytest.mark.slow
def test_distillation_run_trains_a_student_on_the_teachers_tokenizer(base, data, tmp_path, teacher):
    import torch.nn.functional as F

    from llmkit.loading import load_model
    from llmkit.task_data import collator, encode, eval_task, load_task_data
    from llmkit.task_data import score
    from llmkit.tokenizer import load_tokenizer

    recipe = load_recipe(None, [*overrides("", data, tmp_path / "runs", "student"), 'model.path=""',
                                f"tokenizer.path={teacher}", f"distill.teacher={teacher}", "distill.alpha=0.5",
                                "model.n_layer=1", "model.n_head=2", "model.d_model=32", "model.d_ff=64",
                                "model.max_positions=64",
                                "data.block_size=32",  # Recipe.check compares it to model.max_positions
                                "train.max_steps=3", "train.eval_every=3"])
    result = finetune.run(recipe)
    run_dir = result.run_dir
    assert result.test_metrics["count"] == 4
    assert json.loads((run_dir / "config.json").read_text())["id2label"] == \
        json.loads((teacher / "config.json").read_text())["id2label"]
    assert load_tokenizer(str(run_dir)).get_vocab() == load_tokenizer(str(teacher)).get_vocab()
    assert [row["step"] for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row] == [1, 2, 3]

    # The validation scores reported are the saved student's (the only evaluation, step 3): its accuracy as
    # `llmkit eval` scores it, and as loss the mix 0.5 x cross-entropy + 0.5 x T^2 x KL(teacher || student)
    # over the validation batch (5 rows, one batch, padded on the right as in training).
    student, tokenizer = load_model(str(run_dir), head="sequence-classification")
    data = load_task_data(recipe.finetune, recipe.run.seed)
    scores = score(student, tokenizer, eval_task(recipe.finetune, recipe.finetune.source),
                                       data.validation, 16)
    assert result.validation_metrics["accuracy"] == scores["accuracy"]
    tokenizer.padding_side = "right"
    batch = collator("classification", tokenizer)(encode(recipe.finetune, tokenizer, data.validation, data.labels).rows)
    teacher_model, _ = load_model(str(teacher), head="sequence-classification")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    t = recipe.distill.temperature
    with torch.no_grad():
        logits, teacher_logits = student(**inputs).logits.double(), teacher_model(**inputs).logits.double()
    p_teacher = F.softmax(teacher_logits / t, -1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(logits / t, -1))).sum(-1).mean()
    expected = 0.5 * F.cross_entropy(logits, batch["labels"]) + 0.5 * t * t * kl
    assert result.validation_metrics["loss"] == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.slow
def test_teacher_with_another_tokenizer_is_refused(recipe_file, tmp_path, base, data, teacher):
    # No tokenizer.path: the student trains its own tokenizer, which the teacher cannot read.
    result = invoke_finetune(recipe_file, tmp_path, base, data, ['model.path=""', f"distill.teacher={teacher}",
                                                                 "tokenizer.vocab_size=500", "model.n_layer=1",
                                                                 "model.d_model=32", "model.n_head=2"])
    assert result.exit_code == 2, result.output
    assert f"distill.teacher {teacher}: its tokenizer differs from the student's" in result.stderr
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- model selection, resume


@pytest.mark.slow
def test_epochs_with_eval_every_0_train_whole_epochs_and_evaluate_after_each(base, data, tmp_path):
    # 43 training rows in batches of 16: 3 steps an epoch (train.max_steps=2 of the overrides gives way).
    result = train(base, data, tmp_path, "classification", "full", "train.epochs=2", "train.eval_every=0",
                   "train.batch_size=16")
    rows = read_jsonl(result.run_dir / "metrics.jsonl")
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4, 5, 6]
    assert [(row["step"], row["epoch"]) for row in rows if "eval_loss" in row] == [(3, 1.0), (6, 2.0)]
    assert json.loads((result.run_dir / "final_metrics.json").read_text())["step"] == 6


@pytest.mark.slow
def test_early_stopping_ends_training_when_the_metric_stops_improving(base, data, tmp_path):
    # A learning rate too small to change a prediction: accuracy never improves after the first evaluation.
    result = train(base, data, tmp_path, "classification", "full", "finetune.early_stopping_patience=1",
                   "finetune.metric=accuracy", "train.learning_rate=1e-12", "train.max_steps=10", "train.eval_every=1")
    evaluations = [row["step"] for row in read_jsonl(result.run_dir / "metrics.jsonl") if "eval_loss" in row]
    assert evaluations == [1, 2]
    assert json.loads((result.run_dir / "final_metrics.json").read_text())["step"] == 2


@pytest.mark.slow
def test_best_checkpoint_by_the_recipe_metric_is_kept(base, data, tmp_path):
    from llmkit.loading import load_model
    from llmkit.task_data import eval_task, load_task_data
    from llmkit.task_data import score

    # A learning rate high enough for the validation loss to go up and down.
    more = ["finetune.metric=loss", "train.learning_rate=0.05", "train.max_steps=6", "train.eval_every=1"]
    result = train(base, data, tmp_path, "classification", "full", *more)
    evaluations = [row for row in read_jsonl(result.run_dir / "metrics.jsonl") if "eval_loss" in row]
    best = min(evaluations, key=lambda row: row["eval_loss"])
    assert best["step"] != evaluations[-1]["step"], "the last evaluation is the best: the test proves nothing"
    final = json.loads((result.run_dir / "final_metrics.json").read_text())
    assert final["validation"] == {k[len("eval_"):]: v for k, v in best.items() if k.startswith("eval_")}
    assert result.validation_metrics == final["validation"]
    # The saved model is that checkpoint: it scores the validation split as the best evaluation did.
    recipe = load_recipe(result.run_dir / "recipe.toml")
    validation = load_task_data(recipe.finetune, recipe.run.seed).validation
    model, tokenizer = load_model(str(result.run_dir), head="sequence-classification")
    scores = score(model, tokenizer, eval_task(recipe.finetune, recipe.finetune.source),
                                       validation, 16)
    assert scores["accuracy"] == best["eval_accuracy"]


@pytest.mark.slow
def test_resume_after_an_interrupt_logs_and_ends_as_an_uninterrupted_run(base, data, tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    # Interrupted at step 3 of 8, the run resumes mid-epoch and crosses into the second epoch (43 training
    # rows: 6 batches of 8): each later step's loss, learning rate and gradient norm match only if the weights,
    # the optimizer, the schedule and the data order all come back. Kept by validation loss, which falls here,
    # so the final model is step 8, not a checkpoint from before the interrupt.
    more = ["train.max_steps=8", "train.eval_every=4", "train.learning_rate=1e-2", "finetune.metric=loss"]
    whole = train(base, data, tmp_path, "classification", "full", *more, name="whole")

    with interrupted_at(monkeypatch, 3):
        train(base, data, tmp_path, "classification", "full", *more, name="parts")
    assert (tmp_path / "runs" / "parts" / "checkpoints" / "checkpoint-3").is_dir()
    resumed = train(base, data, tmp_path, "classification", "full", *more, name="parts", resume=True)

    def logged(run) -> list[tuple]:
        keys = ("loss", "learning_rate", "grad_norm", "eval_loss")
        return [(row["step"], key, row[key]) for row in read_jsonl(run.run_dir / "metrics.jsonl") for key in keys
                if key in row]

    expected, got = logged(whole), logged(resumed)
    assert [step for step, key, _ in got if key == "loss"] == list(range(1, 9))
    assert [row[:2] for row in got] == [row[:2] for row in expected]
    assert [row[2] for row in got] == pytest.approx([row[2] for row in expected], rel=0, abs=1e-6)
    evaluations = [(step, value) for step, key, value in expected if key == "eval_loss"]
    assert [step for step, _ in evaluations] == [4, 8] and evaluations[1][1] < evaluations[0][1]
    assert resumed.validation_metrics["loss"] == whole.validation_metrics["loss"] == evaluations[1][1]
    a = AutoModelForSequenceClassification.from_pretrained(whole.run_dir).state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(resumed.run_dir).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)


def test_bf16_training_scores_the_test_split_with_the_model_as_saved(base, data, tmp_path):
    """Mixed precision wraps the model's forward in autocast; the test split is scored (and samples made)
    by the model as saved and as `llmkit eval` loads it, in fp32, not through that wrapper."""
    import torch

    from llmkit.loading import load_model

    class KeepModel(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            self.model = model

    kept = KeepModel()
    result = train(base, data, tmp_path, "classification", "full", "train.precision=bf16", callbacks=[kept])
    reloaded, tokenizer = load_model(str(result.run_dir), head="sequence-classification")
    inputs = tokenizer(["今天天气很好", "我们"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        scored, saved = kept.model.eval()(**inputs).logits, reloaded(**inputs).logits
    assert scored.dtype == torch.float32 and torch.allclose(scored, saved, atol=1e-5)


@pytest.mark.parametrize("pretraining, overrides", [
    ("pretrain-sentiment", []),  # domain-adaptive: a Llama on the training reviews' texts (README: Fine-tuning)
    ("pretrain-zh-mlm", ["model.arch=bert", "train.objective=mlm"]),  # a masked LM's encoder
])
def test_a_model_pretrained_first_is_the_classifiers_starting_encoder(data, tmp_path, tiny, pretraining, overrides):
    """The recipe chain PRETRAINING -> classify (model.path = the pretraining run): fine-tuning starts from the
    pretrained model (every weight as saved by the pretraining run, all but its language-model head), not
    from a fresh one."""
    from safetensors.torch import load_file

    from llmkit import pretrain

    base = pretrain.run(load_recipe(pretraining, [*tiny, *overrides, "run.name=base", "train.max_steps=3"]))

    class FirstWeights(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    first = FirstWeights()
    recipe = load_recipe("classify", [f"finetune.source={data['classification']}",
                                      f"finetune.test_source={data['classification:test']}",
                                      f"model.path={base.run_dir}", "train.epochs=0", "train.max_steps=1",
                                      "train.eval_every=1", "train.save_every=1", "train.precision=fp32",
                                      f"run.output_dir={tmp_path / 'runs'}", "run.name=classify"])
    finetune.run(recipe, callbacks=[first])
    pretrained = load_file(base.run_dir / "model.safetensors")
    body = [k for k in pretrained if not k.startswith(("lm_head.", "cls."))]  # all but the LM head
    assert len(body) > 10 and all(torch.equal(first.weights[k], pretrained[k]) for k in body)
