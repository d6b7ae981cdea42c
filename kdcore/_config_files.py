"""Reading distillation configs from TOML, JSON or YAML files.

A file's top-level tables are mode names; what :func:`load_config` returns is what
``kd.convert(model, mode=...)`` takes::

    [kd_loss]
    teacher_model = { name = "callable", target = "mypkg.models:build_teacher" }
    loss_balancer = { name = "static", kd_loss_weight = 0.4 }
    [[kd_loss.criterion]]
    student = ""
    teacher = ""
    loss = { name = "logits", temperature = 3.0 }
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdcore._errors import ConfigError, ConfigTypeError, KDCoreError, cut, shown
from kdcore._modes import check

READERS = {".toml": "TOML", ".json": "JSON", ".yaml": "YAML", ".yml": "YAML"}

#: How many values YAML aliases (``*name``) may add to a file once expanded. An alias repeats
#: what its anchor names, so a few hundred bytes of aliases to aliases can stand for billions
#: of values ("billion laughs"); a real config repeats a few tables.
MAX_ALIAS_VALUES = 100_000


def load_config(
    path: str | os.PathLike[str], *, imports: bool = True
) -> list[tuple[str, dict[str, Any]]]:
    """Read ``path`` and check it (plugin names, keys, types) before anything is built.

    The check is :func:`kdcore.check`'s; ``imports=False`` checks without importing or calling
    anything the file names (see there). Errors name the file and the path of the bad value
    inside it.
    """
    path = Path(path)
    data = read_config_file(path)
    modes = []
    for name, table in data.items():
        if not isinstance(table, dict):
            raise ConfigTypeError(
                f"{path}: top-level {shown(name)} must be a table of that mode's config, "
                f"got {type(table).__name__}"
            )
        modes.append((name, table))
    if not modes:
        raise ConfigError(f"{path}: no mode tables (expected e.g. [kd_loss])")
    try:
        check(modes, imports=imports)
    except KDCoreError as exc:
        exc.args = (f"{path}: {exc.args[0]}", *exc.args[1:])
        raise
    return modes


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse ``path`` by its suffix into a dict; parse errors become :class:`ConfigError`.

    Refused as well, naming the file and the key's path: a key given twice in one table, a
    number out of range (an integer of more digits than Python converts, a float literal
    beyond the largest float) and, in YAML, aliases that expand beyond :data:`MAX_ALIAS_VALUES`.
    """
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"{path}: unknown config format; use one of {', '.join(READERS)}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    import tomllib  # here, not at import time: most runs never read a config file

    try:
        if kind == "TOML":
            data: Any = _load_toml(text, path)
        elif kind == "JSON":
            data = json.loads(
                text,
                object_pairs_hook=_json_object,
                parse_int=_number(int),
                parse_float=_number(float),
            )
        else:
            data = _load_yaml(text, path)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {kind}: {exc}") from None
    except RecursionError:  # the parsers' answer to deep nesting is not a parse error
        raise ConfigError(f"{path}: not valid {kind}: nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigTypeError(f"{path}: the top level must be a table of modes")
    _refuse_marked_values(data, path)
    return data


class _OutOfRange:
    """Stands, in parsed data, for a number literal Python cannot hold, until its path is known."""

    def __init__(self, literal: str, kind: type) -> None:
        self.literal = literal
        self.kind = kind

    def message(self) -> str:
        if self.kind is int:  # int() refuses more than sys.get_int_max_str_digits() digits
            digits = sum(c.isdigit() for c in self.literal)
            return f"an integer of {digits:,} digits is out of range"
        literal = self.literal if len(self.literal) <= 40 else f"{self.literal[:20]}..."
        return f"{literal} is out of range (beyond the largest float)"


class _Duplicated(dict):  # type: ignore[type-arg]
    """A parsed table in which ``key`` was given twice (the JSON parser would keep the last)."""

    def __init__(self, key: Any) -> None:
        super().__init__()
        self.key = key


def _number(kind: type) -> Any:
    """A number parser that marks literals out of ``kind``'s range, instead of failing without
    a path (int: more digits than Python converts) or silently becoming infinite (float)."""

    def parse(literal: str) -> Any:
        try:
            value = kind(literal)
        except ValueError:
            return _OutOfRange(literal, kind)
        if kind is float and math.isinf(value) and "inf" not in literal.lower():
            return _OutOfRange(literal, kind)  # 1e400 is not a way to write infinity
        return value

    return parse


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for key, value in pairs:
        if key in table:
            return _Duplicated(key)
        table[key] = value
    return table


def _refuse_marked_values(data: dict[str, Any], path: Path) -> None:
    """Raise for the first :class:`_OutOfRange` or :class:`_Duplicated` in ``data``, naming its
    config path."""
    for where, value in _walk(data):
        if isinstance(value, _OutOfRange):
            raise ConfigError(f"{path}: {cut(where)}: {value.message()}")
        if isinstance(value, _Duplicated):
            raise ConfigError(f"{path}: {cut(_join(where, value.key))}: the key is given twice")


def _walk(data: Any) -> Iterator[tuple[str, Any]]:
    """(config path, value) of everything in ``data`` (and of keys that are numbers out of
    range). Iterative: the parsers allow more nesting than Python's recursion limit."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        where, value = stack.pop()
        yield where, value
        if isinstance(value, dict):
            items = [(_join(where, key), item) for key, item in value.items()]
            items += [(where, key) for key in value if isinstance(key, _OutOfRange)]
        elif isinstance(value, list):
            items = [(f"{where}[{index}]", item) for index, item in enumerate(value)]
        else:
            continue
        stack.extend(reversed(items))


def _join(where: str, key: object) -> str:
    return f"{where}.{key}" if where else str(key)


# A decimal integer literal of more digits than int() converts (``_`` may separate digits).
_LONG_INTEGER = re.compile(r"[+-]?\d(?:_?\d){4300,}")
_MARKER = "kdcore: an integer out of range"


def _load_toml(text: str, path: Path) -> Any:
    import tomllib

    try:
        return tomllib.loads(text, parse_float=_number(float))
    except tomllib.TOMLDecodeError:
        raise
    except ValueError:
        # tomllib converts integers itself, and int() refuses a literal of too many digits
        # without saying where. Parse again with such literals as strings to find their paths.
        long_integer = _LONG_INTEGER.search(text)
        if long_integer is None:
            raise
    line = text.count("\n", 0, long_integer.start()) + 1
    try:
        data = tomllib.loads(_LONG_INTEGER.sub(f'"{_MARKER}"', text))
    except ValueError:  # the digits were inside a string, say
        raise ConfigError(f"{path}: line {line}: an integer out of range") from None
    where = next((where for where, value in _walk(data) if value == _MARKER), f"line {line}")
    raise ConfigError(f"{path}: {cut(where)}: an integer of more than 4,300 digits is out of range")


def _load_yaml(text: str, path: Path) -> Any:
    try:
        import yaml
    except ImportError:
        raise ConfigError(
            f"{path}: reading YAML needs PyYAML: pip install 'kdcore[yaml]'"
        ) from None
    loader = _yaml_loader()(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_nodes(node, path)  # before anything is built from the nodes
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()


@functools.cache
def _yaml_loader() -> type:
    """PyYAML's SafeLoader (a config file never constructs Python objects), with numbers out of
    range marked for :func:`_refuse_marked_values` instead of raising or becoming infinite."""
    import yaml

    class ConfigLoader(yaml.SafeLoader):
        def construct_yaml_int(self, node: Any) -> Any:
            try:
                return super().construct_yaml_int(node)
            except ValueError:  # int(): more digits than Python converts
                return _OutOfRange(node.value, int)

        def construct_yaml_float(self, node: Any) -> Any:
            value = super().construct_yaml_float(node)
            if math.isinf(value) and "inf" not in node.value.lower():
                return _OutOfRange(node.value, float)
            return value

    ConfigLoader.add_constructor("tag:yaml.org,2002:int", ConfigLoader.construct_yaml_int)
    ConfigLoader.add_constructor("tag:yaml.org,2002:float", ConfigLoader.construct_yaml_float)
    return ConfigLoader


def _check_yaml_nodes(root: Any, path: Path) -> None:
    """Refuse recursive aliases, aliases that add more than :data:`MAX_ALIAS_VALUES` values and
    keys given twice in a mapping, before anything is constructed. Linear in the file's size:
    each node is visited once, however often aliases repeat it."""
    expanded: dict[int, int] = {}  # node id -> how many values it stands for, expanded
    open_nodes: set[int] = set()  # nodes whose children are being counted: the current path
    stack: list[tuple[Any, str, bool]] = [(root, "", False)]
    while stack:
        node, where, counted = stack.pop()
        if counted:
            open_nodes.discard(id(node))
            expanded[id(node)] = 1 + sum(expanded[id(child)] for child in _yaml_nodes(node))
            continue
        if id(node) in expanded:
            continue
        if id(node) in open_nodes:
            raise ConfigError(f"{path}: {cut(where)}: a YAML alias refers to a table holding it")
        open_nodes.add(id(node))
        stack.append((node, where, True))
        keys: set[tuple[str, str]] = set()
        for key, child_where, child in _yaml_children(node, where):
            if key in keys and key[1] != "<<":  # merge keys may repeat (`<<: *a`, `<<: *b`)
                raise ConfigError(f"{path}: {cut(child_where)}: the key is given twice")
            if key is not None:
                keys.add(key)
            if id(child) not in expanded:
                stack.append((child, child_where, False))
    added = expanded[id(root)] - len(expanded)
    if added > MAX_ALIAS_VALUES:
        raise ConfigError(
            f"{path}: YAML aliases expand the file by {added:,} values; at most "
            f"{MAX_ALIAS_VALUES:,} are allowed"
        )


def _yaml_children(node: Any, where: str) -> list[tuple[tuple[str, str] | None, str, Any]]:
    """``(key, path, node)`` of a node's children; a scalar key is ``(tag, text)``, others None."""
    import yaml

    if isinstance(node, yaml.SequenceNode):
        return [(None, f"{where}[{i}]", child) for i, child in enumerate(node.value)]
    if isinstance(node, yaml.MappingNode):
        children = []
        for key_node, child in node.value:
            scalar = isinstance(key_node, yaml.ScalarNode)
            key = (key_node.tag, key_node.value) if scalar else None
            children.append((key, _join(where, key_node.value if scalar else "?"), child))
        return children
    return []


def _yaml_nodes(node: Any) -> list[Any]:
    """The value nodes of a sequence or mapping node (keys are scalars or refused later)."""
    import yaml

    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [child for _, child in node.value]
    return []
