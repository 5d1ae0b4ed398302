"""The READMEs' agreement: README.zh.md, the Chinese translation, keeps in step with README.md.

Both have the same fenced code blocks (commands, recipes, outputs), byte for byte and in the same order, and
the same sequence of `##` / `###` headings; each links to the other, and every in-page link (`#anchor`) of
either names a heading of its own file, as GitHub makes anchors.
"""

import re
from itertools import zip_longest
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGLISH = ROOT / "README.md"
CHINESE = ROOT / "README.zh.md"
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def parts(path: Path) -> tuple[list[str], list[tuple[int, str]], list[str]]:
    """A Markdown file's fenced code blocks (fences included), its headings (level, text) and its prose lines."""
    blocks, headings, prose = [], [], []
    block: list[str] | None = None
    fence = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if block is None:
            opening = FENCE.match(line)
            if opening:
                block, fence = [line], opening.group(1)
                continue
            prose.append(line)
            heading = HEADING.match(line)
            if heading:
                headings.append((len(heading.group(1)), heading.group(2)))
        else:
            block.append(line)
            closing = FENCE.match(line)
            if closing and closing.group(1)[0] == fence[0] and len(closing.group(1)) >= len(fence) \
                    and not line.strip()[len(closing.group(1)):].strip():
                blocks.append("\n".join(block))
                block = None
    assert block is None, f"{path.name}: a code block opened with {fence} is never closed"
    return blocks, headings, prose


def anchor(text: str) -> str:
    """GitHub's anchor for a heading: lowercased, punctuation dropped (letters of any script kept), spaces to -."""
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def test_the_code_blocks_are_the_same_in_the_same_order():
    english, chinese = parts(ENGLISH)[0], parts(CHINESE)[0]
    assert english, "README.md has no code blocks: the parser is wrong"
    for number, (a, b) in enumerate(zip(english, chinese), start=1):
        assert a == b, f"code block {number} differs:\nREADME.md:\n{a}\n\nREADME.zh.md:\n{b}"
    assert len(english) == len(chinese), \
        f"README.md has {len(english)} code blocks, README.zh.md {len(chinese)}"


def test_the_headings_have_the_same_levels_in_the_same_order():
    english = [level for level, _ in parts(ENGLISH)[1] if level in (2, 3)]
    chinese = [level for level, _ in parts(CHINESE)[1] if level in (2, 3)]
    assert english, "README.md has no ## headings: the parser is wrong"
    side_by_side = zip_longest(
        [f"{'#' * level} {text}" for level, text in parts(ENGLISH)[1] if level in (2, 3)],
        [f"{'#' * level} {text}" for level, text in parts(CHINESE)[1] if level in (2, 3)], fillvalue="")
    assert english == chinese, "the ##/### headings differ (README.md | README.zh.md):\n" + "\n".join(
        f"{a:40} | {b}" for a, b in side_by_side)


def test_each_links_to_the_other():
    assert "[中文](README.zh.md)" in "\n".join(parts(ENGLISH)[2][:5])
    assert parts(CHINESE)[2][0].strip() == "[English](README.md) | 中文"


def test_in_page_links_name_a_heading_of_their_own_file():
    for path in (ENGLISH, CHINESE):
        _, headings, prose = parts(path)
        anchors: set[str] = set()
        for _, text in headings:
            base = anchor(re.sub(r"[`*]", "", text))
            name, number = base, 0
            while name in anchors:
                number += 1
                name = f"{base}-{number}"
            anchors.add(name)
        text = "\n".join(re.sub(r"`[^`]*`", "", line) for line in prose)
        for target in re.findall(r"\]\(#([^)\s]+)\)", text):
            assert target in anchors, f"{path.name}: the link to #{target} names no heading ({sorted(anchors)})"
