"""BERT's next-sentence prediction beside masked LM (train.objective = "mlm+nsp"): sentence pairs
(llmkit/data.py), the Trainer's NSP accuracy (llmkit/training.py), and a tiny pretraining run whose model
reloads with AutoModelForPreTraining and starts a `llmkit finetune`."""

import json
from collections import Counter

import pytest
import torch

from llmkit import finetune, load_recipe, pretrain
from llmkit.data import IS_NEXT, NOT_NEXT, encode_pairs, sentence_pairs, sentences
from llmkit.errors import LlmkitError

from .conftest import char_tokenizer

DOCS = ["今天天气很好。我们去公园！明天下雨吗？", "一句话。", "第一句。第二句；第三句", "A cat. A dog! Yes?"]


def test_sentences_end_after_sentence_punctuation():
    assert sentences("今天天气很好。我们去公园！明天下雨吗？") == ["今天天气很好。", "我们去公园！", "明天下雨吗？"]
    assert sentences("第一句。第二句；第三句") == ["第一句。", "第二句；", "第三句"]
    assert sentences("Hi! Ok?\nNext line") == ["Hi!", "Ok?", "Next line"]
    assert sentences("。。") == ["。", "。"] and sentences("  ") == []


def test_pairs_are_consecutive_sentences_or_a_random_one_of_another_document_half_the_time():
    documents = ["".join(f"文{d}句{s}。" for s in range(6)) for d in range(40)]
    pairs = sentence_pairs(documents, seed=3)
    assert len(pairs) == 40 * 5  # every two consecutive sentences of a document
    assert pairs == sentence_pairs(documents, seed=3) and pairs != sentence_pairs(documents, seed=4)
    labels = Counter(label for _, _, label in pairs)
    assert 0.4 < labels[NOT_NEXT] / len(pairs) < 0.6
    for first, second, label in pairs:
        document, sentence = first[1:first.index("句")], int(first[first.index("句") + 1:-1])
        if label == IS_NEXT:
            assert second == f"文{document}句{sentence + 1}。"
        else:
            assert not second.startswith(f"文{document}句")  # another document's


def test_one_document_pairs_only_with_itself():
    pairs = sentence_pairs(["一。二。三。"], seed=0)
    assert pairs == [("一。", "二。", IS_NEXT), ("二。", "三。", IS_NEXT)]
    assert sentence_pairs(["只有一句。", "也只有一句"], seed=0) == []


def test_encoded_pairs_carry_segment_ids_and_fit_the_block():
    tokenizer = char_tokenizer("mlm")
    encoded = encode_pairs([("今天好。", "明天下雨", IS_NEXT), ("中国" * 40, "人民" * 40, NOT_NEXT)], tokenizer, 32)
    first = encoded[0]
    assert tokenizer.convert_ids_to_tokens(first["input_ids"]) == \
        ["[CLS]", *"今天好。", "[SEP]", *"明天下雨", "[SEP]"]
    assert first["token_type_ids"] == [0] * 6 + [1] * 5 and first["next_sentence_label"] == IS_NEXT
    long = encoded[1]
    second = sum(long["token_type_ids"]) - 1  # B's tokens (its [SEP] is segment 1 too)
    assert len(long["input_ids"]) == 32 and abs((32 - 3 - second) - second) <= 1  # both cut, the longer first
    assert long["next_sentence_label"] == NOT_NEXT


def test_nsp_needs_bert():
    with pytest.raises(LlmkitError, match='does not fit train.objective = "mlm\\+nsp"'):
        pretrain.run(load_recipe("pretrain-zh-tiny", ["train.objective=mlm+nsp"]))


@pytest.mark.slow
def test_mlm_nsp_trains_reports_nsp_accuracy_reloads_and_starts_a_finetune(tiny, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForPreTraining, AutoTokenizer, TrainerCallback

    steps = ["train.max_steps=24", "train.eval_every=12", "train.save_every=12", "train.log_every=4",
             "train.learning_rate=5e-3"]
    result = pretrain.run(load_recipe("pretrain-zh-tiny", [*tiny, "model.arch=bert", "train.objective=mlm+nsp",
                                                           *steps]))
    run_dir = tmp_path / "runs" / "tiny"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    evals = [row for row in rows if "eval_loss" in row]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert [row["step"] for row in evals] == [12, 24]
    assert all(0 <= row["eval_nsp_accuracy"] <= 1 and row["eval_mlm_loss"] < row["eval_loss"] for row in evals)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["eval_nsp_accuracy"] == result.metrics["eval_nsp_accuracy"] == evals[-1]["eval_nsp_accuracy"]
    assert "baseline_ngram_loss_per_char" not in final  # the baseline is for causal models

    model = AutoModelForPreTraining.from_pretrained(run_dir).eval()
    assert type(model).__name__ == "BertForPreTraining"
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    inputs = tokenizer("今天天气很好。", "明天下雨。", return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    assert outputs.seq_relationship_logits.shape == (1, 2)
    assert inputs["token_type_ids"][0].tolist().count(1) == len("明天下雨。") + 1

    class FirstWeights(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    data = tmp_path / "classify.jsonl"
    texts = ["今天天气很好", "明天下雨", "中国人民", "经济发展很快", "天气预报", "人民日报社论"] * 4
    data.write_text("".join(json.dumps({"text": t, "label": str(i % 2)}, ensure_ascii=False) + "\n"
                            for i, t in enumerate(texts)), encoding="utf-8")
    first = FirstWeights()
    finetune.run(load_recipe("classify", [f"finetune.source={data}", "finetune.test_source=", f"model.path={run_dir}",
                                          "train.epochs=0", "train.max_steps=1", "train.eval_every=1",
                                          "train.save_every=1", "train.precision=fp32",
                                          f"run.output_dir={tmp_path / 'runs'}", "run.name=classify"]),
                 callbacks=[first])
    pretrained = {k: v for k, v in load_file(run_dir / "model.safetensors").items() if k.startswith("bert.")}
    encoder = [k for k in pretrained if ".encoder." in k or ".embeddings." in k or ".pooler." in k]
    assert encoder and all(torch.equal(first.weights[k], pretrained[k]) for k in encoder)
