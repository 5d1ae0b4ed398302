"""A built-in image data set made on the fly: scenes of one to three simple shapes drawn with Pillow, each
with a Chinese caption and a few questions and answers; no download, the same on every machine.

A scene is one to three objects (a colour and a shape each, with some size and place jitter) on a white,
grey or black background. Captions follow one grammar per object count:

    一个红色的圆在左边                                  one object: where it is (左边/右边/上边/下边/中间)
    一个红色的圆在蓝色正方形的左边                      two: the left (or upper) one first: 左边 or 上边
    红色的圆、蓝色的正方形和绿色的星形从左到右排成一行  three: their order in a row or a column
    (…，背景是黑色)                                     a background that is not white

The splits hold out whole compositions: four colour–shape pairs (HELD_OUT) never appear in `train` nor in
`test` (new images of the compositions seen in training); every `heldout` scene has at least one of them.
`read_scene` reads a caption back into its attributes (colour, shape, count, position), so that a
generated caption is scored attribute by attribute against the truth.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from llmkit.errors import LlmkitError

COLOURS = {"红色": (220, 40, 40), "绿色": (30, 160, 60), "蓝色": (40, 80, 230), "黄色": (240, 200, 20),
           "紫色": (150, 60, 190)}
SHAPES = ("圆", "正方形", "三角形", "星形")
BACKGROUNDS = {"白色": (255, 255, 255), "灰色": (128, 128, 128), "黑色": (0, 0, 0)}
HELD_OUT = frozenset({("红色", "星形"), ("绿色", "三角形"), ("蓝色", "圆"), ("黄色", "正方形")})  # never trained on
PLACES = {"左边": (0, 1), "右边": (2, 1), "上边": (1, 0), "下边": (1, 2), "中间": (1, 1)}  # one object: its grid cell
ROWS = {"从左到右": "horizontal", "从上到下": "vertical"}
OPPOSITE = {"左边": "右边", "上边": "下边"}  # two objects: where the second is beside the first  # three objects: the direction they are read in
NUMBERS = ("没有", "一个", "两个", "三个")
CAPTION_PROMPT = "描述这张图片："
SPLIT_SIZES = {"train": 6000, "test": 500, "heldout": 500}  # scenes per split
SPLIT_SEEDS = {"train": 1, "test": 2, "heldout": 3}
RENDER_SIZE = 48  # pixels; the model's image processor resizes to its encoder's size (48 = a 3 x 3 grid of 16-pixel patches)
VERSION = 2  # of the generator: a change makes a new image folder in the cache


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    position: str  # one object: a PLACES key; two: where the first is beside the second; three: a ROWS key
    background: str = "白色"
    cells: tuple[tuple[int, int], ...] = ()  # grid cell (column, row) of each object
    jitter: tuple[tuple[float, float, float], ...] = ()  # per object: dx, dy (share of a cell), size (share of a cell)


# ---------------------------------------------------------------- making scenes


def random_scene(rng: random.Random, held_out: bool) -> Scene:
    """One scene; `held_out`: with at least one HELD_OUT pair (else with none)."""
    while True:
        count = rng.choice((1, 2, 2, 3, 3))
        things = tuple(Thing(rng.choice(list(COLOURS)), rng.choice(SHAPES)) for _ in range(count))
        if any((t.colour, t.shape) in HELD_OUT for t in things) == held_out:
            break
    cells, position = place(rng, count)
    background = rng.choice(list(BACKGROUNDS)) if rng.random() < 0.5 else "白色"
    jitter = tuple((rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15), rng.uniform(0.55, 0.8)) for _ in things)
    return Scene(things, position, background, cells, jitter)


def place(rng: random.Random, count: int) -> tuple[tuple[tuple[int, int], ...], str]:
    """Grid cells of a 3x3 grid for the objects, and the position word the caption uses."""
    if count == 1:
        position = rng.choice(list(PLACES))
        return (PLACES[position],), position
    line = rng.randrange(3)  # the row (or column) the objects share
    if count == 2:  # the first object is the left (or upper) one: one caption per picture, not two
        first, second = sorted(rng.sample(range(3), 2))
        if rng.random() < 0.5:
            return ((first, line), (second, line)), "左边"
        return ((line, first), (line, second)), "上边"
    if rng.random() < 0.5:
        return tuple((column, line) for column in range(3)), "从左到右"
    return tuple((line, row) for row in range(3)), "从上到下"


def render(scene: Scene, size: int = RENDER_SIZE):
    """The scene as a PIL image of size x size pixels."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    cell = size / 3
    for thing, (column, row), (dx, dy, scale) in zip(scene.things, scene.cells, scene.jitter):
        x, y, r = (column + 0.5 + dx) * cell, (row + 0.5 + dy) * cell, scale * cell / 2
        colour = COLOURS[thing.colour]
        if thing.shape == "圆":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        elif thing.shape == "正方形":
            draw.rectangle((x - r * 0.85, y - r * 0.85, x + r * 0.85, y + r * 0.85), fill=colour)
        elif thing.shape == "三角形":
            draw.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=colour)
        else:  # five points: the corners alternate between the outer and the inner circle
            draw.polygon([(x + r * radius * dx, y - r * radius * dy) for radius, (dx, dy) in STAR], fill=colour)
    return image


def star_corners() -> tuple[tuple[float, tuple[float, float]], ...]:
    """A five-pointed star's ten corners: (radius as a share of the object's, unit vector (sin, cos))."""
    import math

    return tuple((1.3 if k % 2 == 0 else 0.5, (math.sin(math.pi * k / 5), math.cos(math.pi * k / 5)))
                 for k in range(10))


STAR = star_corners()


# ---------------------------------------------------------------- texts


def described(thing: Thing) -> str:
    return f"{thing.colour}的{thing.shape}"


def caption(scene: Scene) -> str:
    things = scene.things
    if len(things) == 1:
        text = f"一个{described(things[0])}在{scene.position}"
    elif len(things) == 2:
        text = f"一个{described(things[0])}在{things[1].colour}{things[1].shape}的{scene.position}"
    else:
        text = f"{described(things[0])}、{described(things[1])}和{described(things[2])}{scene.position}排成一行"
    return text + ("" if scene.background == "白色" else f"，背景是{scene.background}")


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """Three (question, answer, attribute) triples about the scene: a count, a colour, a place."""
    things = scene.things
    shape = rng.choice(SHAPES)
    asked = [(f"图中有几个{shape}？", NUMBERS[sum(t.shape == shape for t in things)], "count")]
    single = [t for t in things if sum(u.shape == t.shape for u in things) == 1]
    if single:
        thing = rng.choice(single)
        asked.append((f"{thing.shape}是什么颜色？", thing.colour, "colour"))
    else:
        asked.append(("图中有几个图形？", NUMBERS[len(things)], "count"))
    if len(things) == 1:
        asked.append((f"{described(things[0])}在哪里？", scene.position, "position"))
    elif len(things) == 2:  # about either object: the answer is the caption's side or its opposite
        subject, other = (0, 1) if rng.random() < 0.5 else (1, 0)
        side = scene.position if subject == 0 else OPPOSITE[scene.position]
        asked.append((f"{described(things[subject])}在{things[other].colour}{things[other].shape}的哪一边？", side,
                      "position"))
    else:
        first = "最左边" if scene.position == "从左到右" else "最上边"
        asked.append((f"{first}的是什么？", described(things[0]), "shape"))
    return asked


# ---------------------------------------------------------------- reading a caption back


CAPTION_PARTS = re.compile("|".join([*COLOURS, *SHAPES, *PLACES, *ROWS]))


def read_scene(text: str) -> dict:
    """The attributes a caption states: colours and shapes of its objects in order, how many, and the
    position word; whatever the text does not state is missing (None)."""
    words = CAPTION_PARTS.findall(text)
    colours = [w for w in words if w in COLOURS]
    shapes = [w for w in words if w in SHAPES]
    places = [w for w in words if w in PLACES or w in ROWS]
    return {"colours": colours, "shapes": shapes, "count": len(shapes), "position": places[-1] if places else None}


def attribute_checks(generated: str, reference: str) -> dict[str, list[bool]]:
    """Per attribute, whether the generated caption states each fact of the reference: every object's
    colour and shape (in order), the object count, the position."""
    said, truth = read_scene(generated), read_scene(reference)
    checks = {"colour": [], "shape": [], "count": [said["count"] == truth["count"]],
              "position": [said["position"] == truth["position"]]}
    for name, key in (("colour", "colours"), ("shape", "shapes")):
        checks[name] = [i < len(said[key]) and said[key][i] == value for i, value in enumerate(truth[key])]
    return checks


# ---------------------------------------------------------------- the data sets


def scenes(split: str) -> list[Scene]:
    rng = random.Random(SPLIT_SEEDS[split])
    return [random_scene(rng, held_out=split == "heldout") for _ in range(SPLIT_SIZES[split])]


@lru_cache(maxsize=None)
def split_images(split: str, cache: Path) -> tuple[tuple[Scene, str], ...]:
    """Each scene of a split with the path of its picture, drawn into the cache folder once."""
    folder = cache / f"v{VERSION}-{RENDER_SIZE}px" / split
    folder.mkdir(parents=True, exist_ok=True)
    found = []
    for number, scene in enumerate(scenes(split)):
        path = folder / f"{number:05d}.png"
        if not path.is_file():
            partial = path.with_suffix(f".{os.getpid()}.part")  # another process may draw the same picture
            render(scene).save(partial, format="PNG")
            partial.replace(path)  # a picture cut short by Ctrl-C is never taken for a whole one
        found.append((scene, str(path)))
    return tuple(found)


def check_split(split: str, name: str) -> None:
    if split not in SPLIT_SIZES:
        raise LlmkitError(f"built-in data set {name} has no split {split!r} (expected {', '.join(SPLIT_SIZES)})")


def caption_rows(split: str, cache: Path) -> list[dict]:
    """shapes-caption: {"image": path, "text": caption}, one row per scene."""
    check_split(split, "shapes-caption")
    return [{"image": path, "text": caption(scene)} for scene, path in split_images(split, cache)]


def vqa_rows(split: str, cache: Path) -> list[dict]:
    """shapes-vqa: {"image": path, "question", "answer", "attribute"}, three rows per scene."""
    check_split(split, "shapes-vqa")
    rng = random.Random(SPLIT_SEEDS[split] + 100)
    return [{"image": path, "question": question, "answer": answer, "attribute": attribute}
            for scene, path in split_images(split, cache) for question, answer, attribute in questions(scene, rng)]
