"""JSON objects that refuse repeated keys.

``json.loads`` keeps the last of two equal keys without a word, so a crafted file could show one
value to a reader that sees the first (a viewer, another tool) and another to kdcore. Every JSON
a checkpoint holds is parsed with :func:`no_duplicate_keys`.
"""

from __future__ import annotations

from typing import Any


class DuplicateKeyError(ValueError):
    """A JSON object repeats a key; ``args[0]`` is the key."""


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for ``json.loads`` that refuses repeated keys.

    Example::

        json.loads('{"a": 1, "a": 2}', object_pairs_hook=no_duplicate_keys)  # DuplicateKeyError
    """
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKeyError(key)
        result[key] = value
    return result
