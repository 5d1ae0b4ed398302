"""Recipes: TOML files validated into typed settings (llmkit.settings), with `extends` and overrides.

Layers apply in order: defaults -> the recipe it extends -> the recipe -> `--set key=value` overrides ->
a command's own options (`--top-k 5` is generate.top_k). Each layer is checked on its own, so an error
names the file, the `--set` or the option that holds the bad value.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tomllib
import types
import typing
from pathlib import Path

from llmkit.errors import LlmkitError, did_you_mean
from llmkit.settings import Recipe

RECIPE_SUFFIX = ".toml"


def load_recipe(path: str | Path | None = None, overrides: typing.Sequence[str] = (),
                options: dict[str, object] | None = None) -> Recipe:
    """Read a recipe file (or only defaults when path is None), apply overrides, then `options` (a
    command's options as {"table.key": value}; None = not given), validate."""
    merged: dict = {}
    if path is not None:
        merge(merged, read_layers(find_recipe(path), seen=()))
    for override in overrides:
        merge(merged, parse_override(override))
    for key, value in (options or {}).items():
        if value is not None:
            merge(merged, option_layer(key, value))
    recipe = build(Recipe, merged, source="recipe")
    recipe.check()
    return recipe


def find_recipe(name: str | Path) -> Path:
    """A recipe path as given, or the name of a shipped recipe (`pretrain-zh-tiny`)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = shipped_recipes_dir() / f"{path.stem}{RECIPE_SUFFIX}"
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    names = shipped_recipe_names()
    raise LlmkitError(f"recipe not found: {name}{did_you_mean(path.stem, names)} (shipped recipes: {', '.join(names)})")


def read_layers(path: Path, seen: tuple[Path, ...]) -> dict:
    """One recipe file merged over the recipes it extends, its relative paths made absolute."""
    path = path.resolve()
    if path in seen:
        raise LlmkitError(f"{path}: 'extends' forms a cycle")
    try:
        raw = tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as error:
        raise LlmkitError(f"{path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} "
                          f"at position {error.start})") from None
    except tomllib.TOMLDecodeError as error:
        raise LlmkitError(f"{path}: not valid TOML: {error}") from None
    except OSError as error:
        raise LlmkitError(f"{path}: cannot read: {error.strerror}") from None
    base_name = raw.pop("extends", None)
    check_layer(Recipe, raw, source=str(path), prefix="")
    resolve_paths(raw, path.parent)
    merged: dict = {}
    if base_name is not None:
        if not isinstance(base_name, str):
            raise LlmkitError(f"{path}: extends must be a file name (string), got {base_name!r}")
        merge(merged, read_layers(path.parent / base_name, seen + (path,)))
    merge(merged, raw)
    return merged


def parse_override(text: str) -> dict:
    """`train.learning_rate=3e-4` -> {"train": {"learning_rate": 3e-4}}; values are TOML literals,
    and a value that is not one is taken as a plain string (`data.source=peoples-daily`)."""
    key, sep, value_text = text.partition("=")
    if not sep or not key.strip():
        raise LlmkitError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.learning_rate=3e-4")
    try:
        value = tomllib.loads(f"v = {value_text}")["v"]
    except tomllib.TOMLDecodeError:
        value = value_text
    layer: dict = {}
    node = layer
    *parents, leaf = key.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    check_layer(Recipe, layer, source=f"--set {text}", prefix="")
    resolve_paths(layer, Path.cwd())
    return layer


def option_layer(key: str, value: object) -> dict:
    """A command-line option as a recipe layer: ("generate.top_k", 5) -> {"generate": {"top_k": 5}};
    an error names the option (`--top-k`). A path stays as typed: it is relative to where the command runs,
    and errors name it so."""
    table, name = key.split(".")
    layer = {table: {name: value}}
    check_layer(Recipe, layer, source=f"--{name.replace('_', '-')}", prefix="")
    return layer


def merge(into: dict, layer: dict) -> None:
    """Deep-merge layer into `into`: tables merge key by key, other values replace."""
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


def check_layer(cls: type, raw: dict, source: str, prefix: str) -> None:
    """Refuse unknown keys and values of the wrong type, naming the key and the closest valid one."""
    if not isinstance(raw, dict):
        raise LlmkitError(f"{source}: {prefix.rstrip('.') or 'recipe'} must be a table")
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        name = prefix + key
        if key not in hints:
            hint = did_you_mean(key, hints, prefix) or f" (valid keys: {', '.join(hints)})"
            raise LlmkitError(f"{source}: unknown key '{name}'{hint}")
        expected = hints[key]
        if dataclasses.is_dataclass(expected):
            check_layer(expected, value, source, prefix=f"{name}.")
        elif item_class(expected):
            if not isinstance(value, list):
                raise LlmkitError(f"{source}: {name} must be an array of tables ([[{name}]])")
            for index, item in enumerate(value):
                check_layer(item_class(expected), item, source, prefix=f"{name}[{index}].")
        else:
            check_value(name, value, expected, source)


def item_class(expected: object) -> type | None:
    """The settings class of a list-of-tables field (list[EvalTask] -> EvalTask), else None."""
    args = typing.get_args(expected)
    if typing.get_origin(expected) is list and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def unwrap_optional(expected: object) -> object:
    """`float | None` -> float: a setting that may be left unset (None: decided at run time) takes a float."""
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return next(arg for arg in typing.get_args(expected) if arg is not type(None))
    return expected


def check_value(name: str, value: object, expected: object, source: str) -> None:
    expected = unwrap_optional(expected)
    origin = typing.get_origin(expected)
    if origin is typing.Literal:
        choices = typing.get_args(expected)
        if value not in choices:
            hint = did_you_mean(value, choices) if isinstance(value, str) else ""
            raise LlmkitError(f"{source}: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}{hint}")
    elif origin is list:
        (item_type,) = typing.get_args(expected)
        if not isinstance(value, list) or not all(isinstance(item, item_type) for item in value):
            raise LlmkitError(f"{source}: {name} must be a list of {item_type.__name__}, got {value!r}")
    elif not fits(value, expected):
        raise LlmkitError(f"{source}: {name} must be {type_name(expected)}, got {value!r}")


def fits(value: object, expected: object) -> bool:
    if expected is float:  # an integer too, if it converts (TOML integers have no size limit)
        return isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)
                                            and abs(value) <= sys.float_info.max)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)  # type: ignore[arg-type]


def type_name(expected: object) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            dict: "a table"}.get(expected, str(expected))  # type: ignore[call-overload]


def resolve_paths(raw: dict, folder: Path, cls: type = Recipe) -> None:
    """Make relative path values absolute against `folder` (the recipe's), when they name a local file.

    A value that names nothing local (a built-in corpus, a hub id) is left as it is."""
    hints = typing.get_type_hints(cls)
    for setting in dataclasses.fields(cls):
        value = raw.get(setting.name)
        expected = hints[setting.name]
        if setting.metadata.get("path") and isinstance(value, str) and value:
            raw[setting.name] = resolve_path(value, folder)
        elif dataclasses.is_dataclass(expected) and isinstance(value, dict):
            resolve_paths(value, folder, expected)
        elif item_class(expected) and isinstance(value, list):
            for item in value:
                resolve_paths(item, folder, item_class(expected))


def looks_local(name: str) -> bool:
    """Whether a model or data name that does not exist is a local path (an error to report) rather than a
    hub id (`owner/name`, or a bare `gpt2`): it starts with '.', '/' or '~', has more than one '/' or an
    empty, '.' or '..' part, or its first part is a local folder (`runs/x` once runs/ exists)."""
    parts = name.split("/")
    if name.startswith((".", "/", "~")) or len(parts) > 2 or {"", ".", ".."} & set(parts):
        return True
    return len(parts) == 2 and Path(parts[0]).is_dir()


def resolve_path(value: str, folder: Path) -> str:
    candidate = Path(value).expanduser()
    if candidate.is_absolute():
        return str(candidate)
    local = folder / candidate
    if local.exists() or value.startswith(("./", "../")):
        return str(local.resolve())
    return value


def build(cls: type, raw: dict, source: str):
    """Instantiate the settings dataclass tree from a checked dict (absent keys take defaults)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        expected = hints[key]
        if dataclasses.is_dataclass(expected):
            kwargs[key] = build(expected, value, source)
        elif item_class(expected):
            kwargs[key] = [build(item_class(expected), item, source) for item in value]
        else:
            kwargs[key] = float(value) if unwrap_optional(expected) is float else value
    return cls(**kwargs)


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def recipe_to_toml(recipe: Recipe) -> str:
    """The fully resolved recipe as TOML that `load_recipe` reads back to the same settings. Values are
    written by tomli-w; a list of tables ([[eval.tasks]]) is written as such, one table each, to stay readable."""
    import tomli_w

    parts = []
    for section, table in recipe_to_dict(recipe).items():
        plain = {key: value for key, value in table.items() if not is_table_list(value) and value is not None}
        parts.append(tomli_w.dumps({section: plain}))
        for key, items in ((k, v) for k, v in table.items() if is_table_list(v)):
            parts += [tomli_w.dumps({section: {key: [item]}}) for item in items]  # [[eval.tasks]], its tables under it
    return "\n".join(parts)


def is_table_list(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, dict) for item in value)


@dataclasses.dataclass(frozen=True)
class Key:
    """One recipe key, as `llmkit recipe keys` lists it."""

    name: str  # table.key (eval.tasks[].kind for a key of each [[eval.tasks]] table)
    type: str
    default: object
    comment: str  # the comment beside the field in llmkit/settings.py: its documentation


def recipe_keys(table: str | None = None) -> list[Key]:
    """Every recipe key (of one table) with its type, default and documentation, read from the settings
    classes and their source comments: the defaults and their words live in one place, settings.py."""
    import inspect

    tables = {field.name: field for field in dataclasses.fields(Recipe)}
    if table is not None and table not in tables:
        raise LlmkitError(f"no recipe table [{table}]{did_you_mean(table, tables)} (tables: {', '.join(tables)})")
    comments = field_comments(Path(inspect.getsourcefile(Recipe)))
    chosen = [tables[table]] if table else list(tables.values())
    return [key for field in chosen for key in table_keys(field.name, field.default_factory(), comments)]


def table_keys(prefix: str, instance, comments: dict[tuple[str, str], str]) -> list[Key]:
    hints = typing.get_type_hints(type(instance))
    keys = []
    for field in dataclasses.fields(instance):
        expected = hints[field.name]
        if item_class(expected):
            keys += table_keys(f"{prefix}.{field.name}[]", item_class(expected)(), comments)
            continue
        if dataclasses.is_dataclass(expected):
            keys += table_keys(f"{prefix}.{field.name}", getattr(instance, field.name), comments)
            continue
        owner = next(cls.__name__ for cls in type(instance).__mro__ if field.name in getattr(cls, "__annotations__", {}))
        keys.append(Key(f"{prefix}.{field.name}", type_label(expected), getattr(instance, field.name),
                        comments.get((owner, field.name), "")))
    return keys


def type_label(expected: object) -> str:
    plain = unwrap_optional(expected)
    if typing.get_origin(plain) is typing.Literal:
        label = " | ".join(map(repr, typing.get_args(plain)))
    elif typing.get_origin(plain) is list:
        label = f"list of {typing.get_args(plain)[0].__name__}"
    else:
        label = getattr(plain, "__name__", str(plain))
    return label + (" or unset" if plain is not expected else "")


def field_comments(source: Path) -> dict[tuple[str, str], str]:
    """(class, field) -> the comment at the end of the field's line in a settings module."""
    import ast
    import io
    import tokenize

    text = source.read_text(encoding="utf-8")
    by_line = {token.start[0]: token.string.lstrip("# ").strip()
               for token in tokenize.generate_tokens(io.StringIO(text).readline) if token.type == tokenize.COMMENT}
    comments = {}
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    comments[(node.name, item.target.id)] = by_line.get(item.end_lineno, "")
    return comments


def shipped_recipes_dir() -> Path:
    """Recipes inside an installed wheel (llmkit/recipes), or the repository's recipes/ folder."""
    inside = Path(__file__).parent / "recipes"
    return inside if inside.is_dir() else Path(__file__).parent.parent / "recipes"


def shipped_recipe_names() -> list[str]:
    return sorted(path.stem for path in shipped_recipes_dir().glob(f"*{RECIPE_SUFFIX}"))


def recipe_summary(path: Path) -> str:
    """First comment line of a recipe file: what it is for."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def copy_recipe(name: str, destination: str | Path, overwrite: bool = False) -> Path:
    """Copy a shipped recipe to edit; a destination folder gets the recipe's own file name."""
    source = shipped_recipes_dir() / f"{Path(name).stem}{RECIPE_SUFFIX}"
    if not source.is_file():
        raise LlmkitError(f"no shipped recipe named {name!r} (shipped: {', '.join(shipped_recipe_names())})")
    target = Path(destination)
    if target.is_dir():
        target = target / source.name
    if target.exists() and not overwrite:
        raise LlmkitError(f"{target} exists; pass --overwrite to replace it")
    shutil.copyfile(source, target)
    return target
