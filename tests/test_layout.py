"""The layout the README draws: commands on top, imported only by the CLI; library modules never import a
command; no import circles; every module has a test file, or a test file says at its top that it covers it.

Imports are read from the source with `ast`, wherever they stand (inside functions too): a lazy import is
still a dependency.
"""

import ast
from pathlib import Path

import llmkit

PACKAGE = Path(llmkit.__file__).parent
TESTS = Path(__file__).parent
COMMANDS = {"llmkit.pretrain", "llmkit.finetune", "llmkit.quantize", "llmkit.generate", "llmkit.evaluate",
            "llmkit.export", "llmkit.serve", "llmkit.plan"}
ENTRY_POINTS = {"llmkit.cli", "llmkit.__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """The llmkit modules a file imports (`from llmkit import tasks` imports llmkit.tasks)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in MODULES}


GRAPH = {name: imported_modules(path) - {name} for name, path in MODULES.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_the_reader_sees_lazy_imports_and_finds_a_circle():
    assert "llmkit.loading" in GRAPH["llmkit.evaluate"]  # imported inside run()
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    assert circles(GRAPH) == []


def test_commands_are_imported_only_by_the_cli():
    assert COMMANDS <= set(MODULES)
    for name, imported in GRAPH.items():
        if name not in ENTRY_POINTS:
            assert not imported & COMMANDS, f"{name} imports the command(s) {sorted(imported & COMMANDS)}"


def holds_code(path: Path) -> bool:
    """More than a docstring (a package's face that only describes its folder holds none)."""
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return any(not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) for node in body)


def test_every_module_has_a_test_file_or_one_that_says_it_covers_it():
    headers = {path.name: ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
               for path in TESTS.glob("test_*.py")}
    for name, path in MODULES.items():
        if not holds_code(path):
            continue
        relative = path.relative_to(PACKAGE.parent).as_posix()
        own = f"test_{path.parent.name if path.name == '__init__.py' else path.stem}.py"
        assert own in headers or any(relative in header for header in headers.values()), \
            f"{relative}: no {own}, and no test file says it covers it"


def readme_floors() -> dict[str, int]:
    """The line of the README's layout drawing that names each module, by the names that open the line
    (llmkit/task_kinds/* by its folder); the words after them describe."""
    text = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    drawing = text.split("## Layout", 1)[1].split("```")[1]
    floors = {}
    for number, line in enumerate(drawing.splitlines()):
        for word in line.split() if not line.startswith(" ") else []:
            if not word.endswith((".py", "/")):
                break
            floors[word] = number
    return floors


def test_the_readme_draws_every_module_above_what_it_imports():
    floors = readme_floors()

    def floor(name: str) -> int:
        relative = MODULES[name].relative_to(PACKAGE).as_posix()
        return floors[relative if "/" not in relative else relative.split("/")[0] + "/"]

    for name, imported in GRAPH.items():
        if name in ("llmkit", "llmkit.__main__") or not holds_code(MODULES[name]):
            continue
        for target in imported - {"llmkit", "llmkit.task_kinds"}:
            if target.startswith("llmkit.task_kinds.") and name.startswith("llmkit.task_kinds."):
                continue  # within the folder
            assert floor(target) > floor(name), f"README layout: {name} imports {target}, drawn at or above it"
