"""The ``cached`` teacher loader: a teacher that answers from a teacher cache.

``{"name": "cached", "path": "cache/"}`` gives ``kd.convert`` a teacher that returns, for each
batch, the cached sparse distribution of exactly those examples (found by the fingerprint of
their inputs), which ``topk_kl`` and ``forward_kl`` accept in place of logits. A checkpoint
records the cache's teacher fingerprint and vocabulary size with the path, so restoring against
a cache written by another teacher is refused, naming what differs.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from kdcore import TeacherCacheError
from kdcore.plugin import SparseTeacherOutput, TeacherCache, model_inputs


class CachedTeacher(nn.Module):
    """A teacher without weights: ``forward`` looks its inputs up in a :class:`TeacherCache`."""

    layers_note = (  # added to an unknown-layer error (kdcore._plan)
        "; a cached teacher has no layers: it serves only its output's top-k logits, to the "
        "sparse logit criteria (topk_kl, forward_kl, logits)"
    )

    def __init__(self, cache: TeacherCache) -> None:
        super().__init__()
        self.cache = cache

    def forward(self, *args: Any, **kwargs: Any) -> SparseTeacherOutput:
        return self.cache.lookup(model_inputs(args, kwargs), kwargs.get("attention_mask"))

    def extra_repr(self) -> str:
        return f"{str(self.cache.folder)!r}, {self.cache.examples} examples"


def load_cached_teacher(
    path: str, teacher_fingerprint: str | None = None, vocab_size: int | None = None
) -> nn.Module:
    """The cache at ``path`` as a teacher; ``teacher_fingerprint``/``vocab_size``, when given
    (a checkpoint records them), must be the cache's."""
    if teacher_fingerprint is not None and not os.path.exists(path):
        raise TeacherCacheError(
            f"the teacher cache {path} recorded in the checkpoint is gone; if it moved, pass "
            "kd.restore(..., teacher_model=load_cached_teacher(NEW_PATH)) (from "
            "kdcore_builtins.cached_teacher), or cache the teacher again there"
        )
    cache = TeacherCache(path)
    expected = {"teacher_fingerprint": teacher_fingerprint, "vocab_size": vocab_size}
    for key, found in cache.written_from.items():
        if expected[key] is not None and expected[key] != found:
            raise TeacherCacheError(
                f"the teacher cache {path} does not match the one recorded: {key} is "
                f"{found!r} there, {expected[key]!r} recorded (the teacher or its vocabulary "
                "changed since; cache it again)"
            )
    return CachedTeacher(cache)


def canonical_cached_teacher(
    path: str, teacher_fingerprint: str | None = None, vocab_size: int | None = None
) -> dict[str, Any]:
    """What a checkpoint records: the absolute path and what the cache was written from."""
    return {"path": os.path.abspath(path), **TeacherCache(path).written_from}


def validate_cached_teacher(
    path: str, teacher_fingerprint: str | None = None, vocab_size: int | None = None
) -> None:
    """Check that ``path`` holds a readable teacher cache (``kdcore check``)."""
    TeacherCache(path).close()


load_cached_teacher.canonical = canonical_cached_teacher  # type: ignore[attr-defined]
load_cached_teacher.validate = validate_cached_teacher  # type: ignore[attr-defined]
