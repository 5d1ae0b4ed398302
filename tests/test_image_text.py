"""Pictures as prompts, the task module (llmkit/task_kinds/image_text.py): rows and their pictures (relative
paths, hub images, bad files), features with the loss on the target only, batches with pixel values,
scores read back from the text and the text-only baseline."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from llmkit import scenes, task_data
from llmkit.errors import LlmkitError
from llmkit.settings import EvalTask, FinetuneSettings, TokenizerSettings, VisionSettings
from llmkit.task_kinds import image_text
from llmkit.tokenizer import train_tokenizer
from llmkit.vision import IMAGE_TOKEN, add_image_token, build_processor, image_tokens

CAPTIONS = ["一个红色的圆在左边", "一个蓝色的正方形在红色圆的右边", "一个绿色的星形在中间，背景是黑色"]


@pytest.fixture(scope="module")
def processor():
    texts = CAPTIONS + [scenes.CAPTION_PROMPT, "图中有几个圆？", "两个", "三个"]
    tokenizer = train_tokenizer(texts, TokenizerSettings(vocab_size=200), "causal")
    add_image_token(tokenizer)
    return build_processor(VisionSettings(image_size=16, patch_size=8), tokenizer)


def picture_folder(folder, count: int = 3) -> list[dict]:
    """Pictures in folder/pics and a rows.jsonl beside them naming them by relative paths."""
    (folder / "pics").mkdir(parents=True)
    rows = []
    for number in range(count):
        Image.new("RGB", (20, 20), (40 * number, 0, 0)).save(folder / "pics" / f"{number}.png")
        rows.append({"image": f"pics/{number}.png", "text": CAPTIONS[number % len(CAPTIONS)]})
    (folder / "rows.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return rows


def test_a_folder_of_pictures_with_a_jsonl_or_csv_is_read_with_paths_relative_to_it(tmp_path):
    picture_folder(tmp_path)
    settings = FinetuneSettings(task="caption", source=str(tmp_path / "rows.jsonl"))
    rows = task_data.read_rows(settings, settings.source, "train")
    assert rows[1] == {"image": str(tmp_path / "pics" / "1.png"), "text": CAPTIONS[1]}
    (tmp_path / "rows.csv").write_text("picture,caption\npics/2.png,一个绿色的星形在中间\n", encoding="utf-8")
    settings = FinetuneSettings(task="caption", image_column="picture", text_column="caption")
    assert task_data.read_rows(settings, str(tmp_path / "rows.csv"), "train")[0]["picture"] == str(tmp_path / "pics/2.png")


def test_hub_images_and_their_bytes_form_are_stored_once_and_read_back_alike(tmp_path):
    picture = Image.new("RGB", (8, 8), (10, 200, 30))
    encoded = io.BytesIO()
    picture.save(encoded, format="PNG")
    rows = [{"image": picture, "text": "x"}, {"image": {"bytes": encoded.getvalue(), "path": None}, "text": "y"}]
    stored = image_text.with_source(rows, FinetuneSettings(task="caption"), "owner/name")
    assert stored[0]["image"] == stored[1]["image"]  # the same picture, the same file
    assert Image.open(stored[0]["image"]).convert("RGB").tobytes() == picture.tobytes()


@pytest.mark.parametrize("make, message", [
    (lambda path: None, "image not found"),
    (lambda path: path.write_text("not a picture"), "is not an image"),
    (lambda path: path.write_bytes(png_bytes()[:60]), "cannot read the image"),
])
def test_a_missing_non_image_or_broken_picture_is_refused_naming_the_row(tmp_path, make, message):
    make(tmp_path / "bad.png")
    (tmp_path / "rows.jsonl").write_text('{"image": "bad.png", "text": "一个红色的圆在左边"}\n')
    settings = FinetuneSettings(task="caption", source=str(tmp_path / "rows.jsonl"))
    with pytest.raises(LlmkitError, match=f"rows.jsonl: row 1: .*{message}"):
        task_data.read_rows(settings, settings.source, "train")


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_features_hold_the_picture_tokens_and_prompt_and_learn_only_the_target(processor):
    rows = [{"image": "a.png", "question": "图中有几个圆？", "answer": "两个"}]
    features = image_text.encode(FinetuneSettings(task="vqa"), processor, rows, {}).rows
    ids, labels = features[0]["input_ids"], features[0]["labels"]
    tokenizer = processor.tokenizer
    start = 1 + image_tokens(processor) + len("图中有几个圆？")
    assert image_tokens(processor) == (16 // 8) ** 2 + 1  # patches and CLS
    assert ids.count(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)) == image_tokens(processor)
    assert labels[:start] == [-100] * start and labels[start:] == ids[start:]
    assert tokenizer.decode(ids[start:]) == "两个" + tokenizer.eos_token
    assert features[0]["image"] == "a.png"


def test_a_batch_pads_the_texts_and_reads_the_pictures(tmp_path, processor):
    rows = [{"image": str(tmp_path / "pics" / row["image"].split("/")[1]), "text": row["text"]}
            for row in picture_folder(tmp_path, 2)]
    features = image_text.encode(FinetuneSettings(task="caption"), processor, rows, {}).rows
    batch = image_text.collator(processor)(features)
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    shorter = min(len(f["input_ids"]) for f in features)
    assert (batch["labels"][0 if len(features[0]["input_ids"]) == shorter else 1, shorter:] == -100).all()


def test_scores_read_attributes_back_and_the_text_only_baseline_writes_the_commonest_target():
    task = EvalTask(kind="caption", source="x.jsonl", split="all")
    rows = [{"image": "a", "text": text} for text in CAPTIONS]
    perfect = image_text.measures(rows, CAPTIONS, CAPTIONS, task)
    assert perfect["attribute_accuracy"] == perfect["exact_match"] == 1.0
    swapped = image_text.measures(rows, ["一个蓝色的圆在左边", *CAPTIONS[1:]], CAPTIONS, task)
    assert swapped["colour_accuracy"] == 3 / 4 and swapped["shape_accuracy"] == 1.0
    train = [{"image": "a", "text": CAPTIONS[0]}] * 2 + [{"image": "b", "text": CAPTIONS[1]}]
    baseline = image_text.baseline(task, train, rows)
    assert baseline["baseline_exact_match"] == 1 / 3  # it always says the commonest caption
    vqa = EvalTask(kind="vqa", source="x.jsonl", split="all")
    questions = [{"image": "a", "question": "图中有几个圆？", "answer": answer, "attribute": "count"}
                 for answer in ("两个", "三个", "两个")]
    assert image_text.baseline(vqa, questions, questions)["baseline_count_accuracy"] == 2 / 3
    cells = dict(image_text.table_cells(perfect | baseline))
    assert cells["attribute_accuracy"] == 1.0 and "baseline_exact_match" in cells
