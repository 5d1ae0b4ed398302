"""The generated pictures (llmkit/scenes.py): the same on every call, held-out compositions only where they
belong, captions and answers that say what the picture shows, and captions read back into attributes."""

from __future__ import annotations

import os
import random

import pytest

from llmkit import scenes
from llmkit.corpora import shapes_caption, shapes_vqa
from llmkit.errors import LlmkitError


def pairs(scene: scenes.Scene) -> set[tuple[str, str]]:
    return {(thing.colour, thing.shape) for thing in scene.things}


def test_the_splits_are_the_same_on_every_call_and_hold_out_whole_compositions():
    assert scenes.scenes("test") == scenes.scenes("test")
    assert all(not pairs(scene) & scenes.HELD_OUT for split in ("train", "test") for scene in scenes.scenes(split))
    assert all(pairs(scene) & scenes.HELD_OUT for scene in scenes.scenes("heldout"))
    seen = {pair for scene in scenes.scenes("train") for pair in pairs(scene)}
    assert len(seen) == len(scenes.COLOURS) * len(scenes.SHAPES) - len(scenes.HELD_OUT)  # every other pair is taught
    counts = {len(scene.things) for scene in scenes.scenes("train")}
    assert counts == {1, 2, 3}


def test_a_picture_shows_its_objects_in_their_colours_where_the_caption_says(tmp_path):
    scene = scenes.Scene((scenes.Thing("红色", "圆"), scenes.Thing("蓝色", "正方形")), "左边", "黑色",
                         cells=((0, 1), (2, 1)), jitter=((0, 0, 0.7), (0, 0, 0.7)))
    image = scenes.render(scene, size=60)
    assert image.getpixel((10, 30)) == scenes.COLOURS["红色"]  # centre of the left middle cell
    assert image.getpixel((50, 30)) == scenes.COLOURS["蓝色"]
    assert image.getpixel((30, 5)) == scenes.BACKGROUNDS["黑色"]
    assert scenes.caption(scene) == "一个红色的圆在蓝色正方形的左边，背景是黑色"


def test_questions_are_answered_by_the_scene():
    scene = scenes.Scene((scenes.Thing("绿色", "三角形"),), "上边", cells=((1, 0),), jitter=((0, 0, 0.7),))
    asked = {attribute: (question, answer) for question, answer, attribute in scenes.questions(scene, random.Random(0))}
    assert asked["colour"] == ("三角形是什么颜色？", "绿色")
    assert asked["position"] == ("绿色的三角形在哪里？", "上边")
    question, answer = asked["count"]
    assert answer == ("一个" if "三角形" in question else "没有")


def test_a_caption_read_back_gives_its_attributes_and_a_wrong_one_fails_where_it_is_wrong():
    truth = "红色的正方形、紫色的星形和蓝色的圆从左到右排成一行"
    assert scenes.read_scene(truth) == {"colours": ["红色", "紫色", "蓝色"], "shapes": ["正方形", "星形", "圆"],
                                        "count": 3, "position": "从左到右"}
    assert all(all(results) for results in scenes.attribute_checks(truth, truth).values())
    wrong = scenes.attribute_checks("红色的正方形、绿色的星形和蓝色的圆从上到下排成一行", truth)
    assert wrong["colour"] == [True, False, True] and all(wrong["shape"]) and wrong["count"] == [True]
    assert wrong["position"] == [False]
    short = scenes.attribute_checks("一个红色的正方形在中间", truth)
    assert short["count"] == [False] and short["shape"] == [True, False, False]


def test_the_built_in_data_sets_name_pictures_drawn_once_into_the_cache():
    rows = shapes_caption("test")
    assert len(rows) == scenes.SPLIT_SIZES["test"] and set(rows[0]) == {"image", "text"}
    first = rows[0]["image"]
    modified = os.path.getmtime(first)
    scenes.split_images.cache_clear()
    assert shapes_caption("test")[0] == rows[0] and os.path.getmtime(first) == modified
    questions = shapes_vqa("test")
    assert len(questions) == 3 * len(rows) and {row["attribute"] for row in questions} <= {"colour", "shape", "count",
                                                                                          "position"}
    with pytest.raises(LlmkitError, match="no split 'dev'"):
        shapes_caption("dev")
