"""Offline distillation: a teacher's sparse output distribution, cached once, read by example.

:func:`cache_teacher` runs the teacher over a data set once and keeps, per position, the
teacher's top-k log-probabilities (at the cache's temperature) and the log of the mass outside
them (the tail). :class:`TeacherCache` reads it back by example: each example is keyed by a
fingerprint of its inputs, so a student's batches may come in any order, shuffled, over any
number of epochs or ranks. The ``cached`` teacher loader turns a cache into a teacher whose
output is a :class:`SparseTeacherOutput`, which ``topk_kl`` and ``forward_kl`` accept.

The format (a folder, never code):

- ``manifest.json``: what the cache depends on (the teacher spec and a fingerprint of its
  weights, the vocabulary size, ``top_k``/``top_p``, temperature, compression) and its
  complete shards, in order;
- ``shard-NNNNN.safetensors`` (``shard-rankR-NNNNN`` from rank R under torchrun, listed in
  ``manifest-rankR.json`` until merged), one per ``examples_per_shard`` examples:
  ``fingerprints`` (uint8 [n, 16], one per example, over its attended tokens), ``offsets``
  (int64 [n + 1], each example's first position row), ``positions`` (int64 [P], a row's
  position within its example, flattened; among its attended tokens), the [P, k]
  vocabulary indices and teacher logits / T at those entries as the compression stores them
  (:mod:`kdcore._cache_codec`; -inf where ``top_p`` kept fewer than k), ``logsumexp``
  (float32 [P], over all the row's logits / T) and ``tail`` (float32 [P], over the others).
  Logits and log-sum-exps rather than log-probabilities, so that the loss computes its
  log-probabilities with the same operations as online ``topk_kl``.

A shard is written to a temporary file, fsynced and renamed, and only then listed in the
manifest (also replaced atomically): a run killed at any point leaves the shards listed so far,
and the next run with the same arguments skips the examples they hold (and re-writes a listed
shard found missing or damaged). Nothing is written before the first shard is complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcore._atomic_io import atomic_write
from kdcore._cache_codec import Codec
from kdcore._errors import ConfigError, KDCoreError, did_you_mean, shown
from kdcore.llm import shift_labels
from kdcore.validation import IGNORE_INDEX, as_logits

__all__ = [
    "SparseTeacherOutput",
    "TeacherCache",
    "TeacherCacheError",
    "cache_teacher",
    "input_fingerprints",
]

FORMAT = "kdcore-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
COMPRESSIONS = ("float32", "bfloat16", "compressed")
FINGERPRINT_BYTES = 16


class TeacherCacheError(KDCoreError, ValueError):
    """A teacher cache that cannot be written or read as asked (names the file and the value)."""


# ---- fingerprints ------------------------------------------------------------------------


def input_fingerprints(
    inputs: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> list[bytes]:
    """One 16-byte fingerprint per example (first dimension) of ``inputs``: its dtype, shape and
    values. Integer inputs (token ids) count as int64, so int32 and int64 ids of the same tokens
    match. With an ``attention_mask`` ``[B, S]`` over token ids ``[B, S]``, only each example's
    attended tokens count, as if unpadded: an example padded on the left, on the right or not at
    all has one fingerprint."""
    if not isinstance(inputs, torch.Tensor) or inputs.dim() == 0:
        raise TeacherCacheError(
            f"the teacher cache keys examples by their input tensor [B, ...]; got {shown(inputs)}"
        )
    x = inputs.detach().cpu()
    x = x.contiguous() if x.is_floating_point() else x.to(torch.int64).contiguous()
    rows = x.reshape(x.shape[0], -1).view(torch.uint8).numpy()
    head = f"{x.dtype}{tuple(x.shape[1:])}".encode()
    mask = attended(inputs, attention_mask)
    if mask is None:
        return [hashlib.sha256(head + row.tobytes()).digest()[:FINGERPRINT_BYTES] for row in rows]
    fingerprints = []
    for row, keep in zip(x, mask.cpu(), strict=True):
        tokens = row[keep]
        head = f"{x.dtype}{tuple(tokens.shape)}".encode()
        digest = hashlib.sha256(head + tokens.view(torch.uint8).numpy().tobytes())
        fingerprints.append(digest.digest()[:FINGERPRINT_BYTES])
    return fingerprints


def attended(inputs: torch.Tensor, attention_mask: Any) -> torch.Tensor | None:
    """Bool ``[B, S]`` of the tokens an ``attention_mask`` keeps, or None where it keeps all (or
    does not apply: no mask, or inputs other than token ids ``[B, S]``)."""
    if not isinstance(attention_mask, torch.Tensor) or inputs.dim() != 2:
        return None
    if tuple(attention_mask.shape) != tuple(inputs.shape):
        raise TeacherCacheError(
            f"attention_mask {tuple(attention_mask.shape)} and input_ids "
            f"{tuple(inputs.shape)} differ in shape"
        )
    mask = attention_mask.detach() != 0
    return None if bool(mask.all()) else mask


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes, values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())  # no copy: hashed in place
    return digest.hexdigest()


# ---- the sparse teacher output -----------------------------------------------------------


class SparseTeacherOutput:
    """A teacher's cached sparse distribution for a batch, in place of its logits.

    ``indices`` (int64) and ``logits`` (float32, -inf where fewer than ``top_k`` were kept)
    are ``[*positions, top_k]``: the kept vocabulary entries and the teacher's
    ``logits / temperature`` there; ``logsumexp`` and ``tail_logsumexp`` ``[*positions]`` are
    the log-sum-exps of all of ``logits / temperature`` and of those not kept (so the kept
    log-probabilities are ``logits - logsumexp``, the tail's ``tail_logsumexp - logsumexp``);
    ``covered`` ``[*positions]`` says which positions the cache holds (a causal LM's cache skips
    the positions whose shifted label is -100).
    """

    def __init__(
        self,
        indices: torch.Tensor,
        logits: torch.Tensor,
        logsumexp: torch.Tensor,
        tail_logsumexp: torch.Tensor,
        covered: torch.Tensor,
        *,
        vocab_size: int,
        temperature: float,
        source: str,
    ) -> None:
        self.indices, self.logits, self.covered = indices, logits, covered
        self.logsumexp, self.tail_logsumexp = logsumexp, tail_logsumexp
        self.vocab_size, self.temperature, self.source = vocab_size, temperature, source

    @property
    def shape(self) -> torch.Size:
        """The positions' shape (the logits' shape without the vocabulary)."""
        return self.covered.shape

    @property
    def criterion_note(self) -> str:
        """What a criterion that refused this output should know (added to its error)."""
        return (
            f"a cached teacher ({self.source}) serves only its top-k logits, which only the "
            "sparse logit criteria take (topk_kl, forward_kl, logits)"
        )

    def to(self, device: torch.device | str) -> SparseTeacherOutput:
        return SparseTeacherOutput(
            self.indices.to(device),
            self.logits.to(device),
            self.logsumexp.to(device),
            self.tail_logsumexp.to(device),
            self.covered.to(device),
            vocab_size=self.vocab_size,
            temperature=self.temperature,
            source=self.source,
        )

    def __repr__(self) -> str:
        return (
            f"SparseTeacherOutput(shape={tuple(self.shape)}, top_k={self.indices.shape[-1]}, "
            f"vocab_size={self.vocab_size}, temperature={self.temperature}, from {self.source})"
        )


# ---- batches -----------------------------------------------------------------------------


def split_batch(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any], torch.Tensor, Any]:
    """``(args, kwargs, inputs, labels)`` of a data-set batch: a tensor of inputs, a tuple
    ``(inputs, labels, ...)`` or a mapping with ``input_ids`` (and optionally ``labels``). The
    teacher is called with ``args``/``kwargs``; ``inputs`` keys the examples."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, batch, None
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise TeacherCacheError(
                f"a mapping batch needs 'input_ids' (they key the cache); got keys "
                f"{shown(sorted(batch))}"
            )
        inputs = batch["input_ids"]
        if isinstance(inputs, torch.Tensor) and inputs.dim() < 2:
            raise TeacherCacheError(
                f"a batch's input_ids are {tuple(inputs.shape)}, one example's tokens: data "
                "yields batches [B, S], not examples; pass batches (e.g. a DataLoader with a "
                "collator that pads)"
            )
        kwargs = {key: value for key, value in batch.items() if key != "labels"}
        return (), kwargs, inputs, batch.get("labels")
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return (batch[0],), {}, batch[0], batch[1] if len(batch) > 1 else None
    raise TeacherCacheError(
        "a batch must be an input tensor, a tuple (inputs, labels) or a mapping with "
        f"'input_ids'; got {type(batch).__name__}"
    )


def model_inputs(args: Sequence[Any], kwargs: Mapping[str, Any]) -> torch.Tensor:
    """The tensor that keys a teacher call's examples (``input_ids``, else the first argument)."""
    if "input_ids" in kwargs:
        return kwargs["input_ids"]  # type: ignore[no-any-return]
    if args:
        return args[0]  # type: ignore[no-any-return]
    raise TeacherCacheError(
        f"the cached teacher needs the batch's inputs (first argument or input_ids=); got "
        f"keywords {shown(sorted(kwargs))}"
    )


def kept_positions(logits: torch.Tensor, labels: Any, mask: torch.Tensor | None) -> torch.Tensor:
    """Bool ``[B, ...]`` of the positions to cache: for a causal LM (logits ``[B, S, V]``), the
    attended tokens (``mask``, from :func:`attended`) whose shifted label (``labels [B, S]``)
    is not -100; else all."""
    keep = torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    if logits.dim() != 3:
        return keep
    if mask is not None and tuple(mask.shape) == tuple(keep.shape):
        keep &= mask.to(keep.device)
    if isinstance(labels, torch.Tensor) and tuple(labels.shape) == tuple(keep.shape):
        keep &= shift_labels(labels.to(logits.device)) != IGNORE_INDEX
    return keep


# ---- writing -----------------------------------------------------------------------------


def sparse_distribution(
    logits: torch.Tensor, top_k: int, top_p: float | None, temperature: float
) -> tuple[torch.Tensor, ...]:
    """``(indices, kept logits, logsumexp, tail logsumexp)`` of rows of logits ``[N, V]``, scaled
    by ``1 / temperature`` in float32 as the online ``topk_kl`` computes them."""
    b = logits.to(torch.float32) if logits.dtype != torch.float64 else logits
    if temperature != 1.0:
        b = b / temperature
    kept, top = b.topk(top_k, dim=-1)  # sorted: largest first
    # torch.logsumexp(b) bit for bit, by its own steps (the row's max, the exponentials of the
    # differences, their sum), online topk_kl's teacher log-sum-exp; the same exponentials
    # without the kept entries give the tail's (within float32 rounding of online's), with no
    # second pass over the row: the write's overhead is the teacher's top-k and one exp.
    top_value = kept[:, :1]
    exponentials = (b - top_value).exp_()
    shift = top_value[:, 0].masked_fill(top_value[:, 0].abs() == math.inf, 0.0)
    lse = exponentials.sum(-1).log_().add_(shift)
    if top_p is not None:  # keep the smallest prefix reaching top_p; pad with the first index
        probs = (kept - lse[:, None]).exp()
        dropped = probs.cumsum(-1) - probs >= top_p
        dropped[:, 0] = False  # the largest is always kept
        kept = kept.masked_fill(dropped, -math.inf)
        top = torch.where(dropped, top[:, :1], top)
    tail = exponentials.scatter_(-1, top, 0.0).sum(-1).log_().add_(shift)  # empty: -inf
    return top, kept.float(), lse.float(), tail.float()


class _ShardBuffer:
    def __init__(self) -> None:
        self.fingerprints: list[bytes] = []
        self.counts: list[int] = []
        self.positions: list[torch.Tensor] = []
        self.indices: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.logsumexp: list[torch.Tensor] = []
        self.tail: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.fingerprints)

    def tensors(self) -> tuple[list[torch.Tensor], ...]:
        """The lists :func:`sparse_distribution`'s results go to, in its order."""
        return self.indices, self.values, self.logsumexp, self.tail


def _teacher_record(teacher: Any) -> tuple[nn.Module, dict[str, Any]]:
    from kdcore._config import PluginRef
    from kdcore._converter import teacher_spec, unstructure
    from kdcore._teacher import build_teacher, canonical_loader_spec

    if isinstance(teacher, nn.Module):
        spec: Any = f"{type(teacher).__module__}.{type(teacher).__qualname__} instance"
        module = teacher
    else:
        where = "cache_teacher(teacher=...)"
        typed = teacher_spec(teacher, path=where)
        module = build_teacher(typed, path=where)
        spec = (
            unstructure(canonical_loader_spec(typed))
            if isinstance(typed, PluginRef)
            else shown(teacher)
        )
    cache = getattr(module, "cache", None)
    if isinstance(cache, TeacherCache):  # it has no weights: its fingerprint would be empty
        raise TeacherCacheError(
            f"cache_teacher(teacher=...) is a cached teacher (the cache {cache.folder}): a cache "
            "cannot be cached again; cache the teacher it was written from "
            f"({shown(cache.manifest['teacher']['spec'])})"
        )
    return module, {"spec": spec, "fingerprint": weights_fingerprint(module)}


def process_group() -> tuple[int, int]:
    """``(rank, world size)`` in the initialised ``torch.distributed`` group; ``(0, 1)``
    without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def cache_teacher(
    teacher: Any,
    data: Iterable[Any],
    path: str | os.PathLike[str],
    *,
    top_k: int = 64,
    top_p: float | None = None,
    temperature: float = 1.0,
    compression: str = "float32",
    examples_per_shard: int = 1024,
    device: torch.device | str | None = None,
    log: Callable[[str], None] | None = None,
    split_data: bool = True,
) -> Path:
    """Run ``teacher`` over ``data`` once and cache its sparse output distribution at ``path``.

    ``teacher`` is an ``nn.Module`` or any teacher spec ``kd.convert`` accepts; ``data`` yields
    batches (e.g. a DataLoader, not a data set of single examples): an input tensor, a tuple
    ``(inputs, labels)`` or a mapping with ``input_ids`` (and ``labels``: a causal LM's
    positions whose shifted label is -100 are skipped; and ``attention_mask``: only attended
    tokens are cached and fingerprinted, so the student may pad each example otherwise). Per
    position the cache keeps the ``top_k`` largest entries of ``logits / temperature`` (with
    ``top_p``, only the smallest prefix whose probability reaches it), their log-sum-exp and
    the tail's. ``compression`` is ``"float32"`` (lossless:
    training from it equals online ``topk_kl``), ``"bfloat16"`` or ``"compressed"`` (at most
    24 bits per entry, index and value, up to V = 2**18 with k = 64; values within 1/1020 of
    each position's range). Rerunning after a kill resumes after the last complete shard; a
    folder written with other arguments or another teacher is refused. ``log`` (e.g.
    ``print``) gets a line per shard written.

    Under ``torch.distributed`` (``torchrun``), each rank caches every world-size-th batch of
    ``data`` from its rank on (give every rank the same data; ``split_data=False`` when each
    rank's ``data`` is its own share already) into shards of its own, listed in a manifest of
    its own (each rank resumes from it); at the end rank 0 merges them into ``manifest.json``
    and only rank 0 logs. Returns the folder::

        kd.cache_teacher(teacher, loader, "cache/", top_k=64)
        kd.convert(student, [("kd_loss", {"teacher_model": {"name": "cached", "path": "cache/"},
                                          "criterion": {"name": "topk_kl", "k": 64}})])
    """
    from kdcore.validation import check_int, check_temperature

    top_k = check_int("top_k", top_k, minimum=1)
    examples_per_shard = check_int("examples_per_shard", examples_per_shard, minimum=1)
    temperature = check_temperature(temperature)
    is_number = isinstance(top_p, (int, float)) and not isinstance(top_p, bool)
    if top_p is not None and not (is_number and 0 < top_p <= 1):
        raise ConfigError(f"must be in (0, 1], got {shown(top_p)}", path="cache_teacher(top_p=...)")
    if compression not in COMPRESSIONS:
        raise ConfigError(
            f"is {shown(compression)}; expected one of {', '.join(COMPRESSIONS)}"
            + did_you_mean(str(compression), COMPRESSIONS),
            path="cache_teacher(compression=...)",
        )
    module, teacher_record = _teacher_record(teacher)
    rank, world = process_group()
    settings: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "teacher": teacher_record,
        "vocab_size": None,
        "position_dims": None,
        "top_k": top_k,
        "top_p": top_p,
        "temperature": temperature,
        "compression": compression,
        "shards": [],
    }
    writer = _ShardWriter(Path(path), settings, rank, world)
    started = time.perf_counter()

    def say(line: str) -> None:
        if log is not None and rank == 0:
            log(line)

    if writer.damaged:
        damaged = "; ".join(f"{name} ({what})" for name, what in writer.damaged.items())
        say(f"re-writing damaged shards: {damaged}")
    if writer.done:
        say(f"resuming {writer.folder}: {len(writer.done)} examples cached already")
    done = writer.done
    was_training = module.training
    module.eval()
    buffer = _ShardBuffer()

    def flush() -> None:
        writer.write(buffer)
        say(
            f"shard {len(writer.manifest['shards'])}: {len(buffer)} examples written, "
            f"{len(done)} seen ({time.perf_counter() - started:.1f} s)"
        )

    try:
        with torch.inference_mode():
            for number, batch in enumerate(data):
                if split_data and number % world != rank:
                    continue
                args, kwargs, inputs, labels = split_batch(batch)
                mask = attended(inputs, kwargs.get("attention_mask"))
                fingerprints = input_fingerprints(inputs, mask)
                fresh = []
                for i, fingerprint in enumerate(fingerprints):
                    if fingerprint not in done:  # cached already, or twice in the batch
                        done.add(fingerprint)
                        fresh.append(i)
                if not fresh:
                    continue
                if device is not None:
                    args = tuple(_to(a, device) for a in args)
                    kwargs = {key: _to(value, device) for key, value in kwargs.items()}
                logits = as_logits(module(*args, **kwargs), "teacher")
                writer.check_vocabulary(logits, top_k)
                keep = kept_positions(logits, labels, mask)
                if len(fresh) < len(fingerprints):
                    logits, keep = logits[fresh], keep[fresh]
                    mask = mask[fresh] if mask is not None else None
                # One top-k over all the batch's kept rows, then split by example.
                chosen = keep.reshape(len(fresh), -1)
                rows = logits.reshape(-1, logits.shape[-1])
                if not bool(chosen.all()):
                    rows = rows[chosen.reshape(-1)]
                parts = sparse_distribution(rows, top_k, top_p, temperature)
                counts = chosen.sum(-1).tolist()
                split = [part.cpu().split(counts) for part in parts]
                # A position is stored as its place among the example's attended tokens, so
                # that the reader can put it back under any padding.
                places = (mask.cumsum(-1) - 1) if mask is not None else None
                for n, i in enumerate(fresh):
                    buffer.fingerprints.append(fingerprints[i])
                    buffer.counts.append(counts[n])
                    kept = chosen[n].nonzero().squeeze(-1)
                    kept = places[n][kept] if places is not None else kept
                    buffer.positions.append(kept.cpu())
                    for store, part in zip(buffer.tensors(), split, strict=True):
                        store.append(part[n])
                    if len(buffer) == examples_per_shard:
                        flush()
                        buffer = _ShardBuffer()
        if len(buffer):
            flush()
    finally:
        module.train(was_training)
    merged = writer.finish()
    if merged:
        say(f"listed the ranks' shards in {writer.folder / MANIFEST}")
    return writer.folder


def _to(value: Any, device: torch.device | str) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


class _ShardWriter:
    """Where one process's shards go. In one process, ``shard-NNNNN.safetensors``, listed in
    ``manifest.json`` as each is complete. Under ``torch.distributed``, rank R writes
    ``shard-rankR-NNNNN.safetensors`` listed in ``manifest-rankR.json`` (so no rank writes
    another's files, and each resumes from its own list); :meth:`finish` has rank 0 merge all
    lists into ``manifest.json`` once every rank is done, so a reader only ever trusts one file
    and sees the cache whole. ``done`` holds the fingerprints every listed shard holds."""

    def __init__(self, folder: Path, settings: dict[str, Any], rank: int, world: int) -> None:
        self.folder, self.settings, self.rank, self.world = folder, settings, rank, world
        self.name = MANIFEST if world == 1 else f"manifest-rank{rank}.json"
        self.prefix = "shard-" if world == 1 else f"shard-rank{rank}-"
        _check_cache_folder(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # Nothing is written before the first shard is complete: a run that fails on its first
        # batch (top_k above the vocabulary, say) leaves the folder as it found it.
        merged = self.merged()
        own = json.loads(json.dumps(self.lists().get(self.name, settings)))
        for key in ("vocab_size", "position_dims"):  # as written by any rank so far
            own[key] = merged[key] if own[key] is None else own[key]
        self.manifest = own
        self.taken = {entry["file"] for entry in merged["shards"]}  # never written over
        cache = TeacherCache(folder, manifest=merged, skip_damaged=True)
        self.done: set[bytes] = set(cache.index)
        self.damaged = cache.damaged
        cache.close()
        if self.damaged:
            self.drop_damaged()

    def drop_damaged(self) -> None:
        """Unlist the damaged or missing shards from every list, so that their examples are
        cached again. Under torch.distributed every rank sees them and refuses: a rank may not
        rewrite another's list."""
        first = sorted(self.damaged)[0]
        if self.world > 1:
            raise TeacherCacheError(
                f"{self.folder}: shard {first} is {self.damaged[first]}; rerun in one process "
                "(without torchrun) to re-write it"
            )
        for name, manifest in self.lists().items():
            kept = [e for e in manifest["shards"] if e["file"] not in self.damaged]
            if len(kept) < len(manifest["shards"]):
                _write_manifest(self.folder, name, {**manifest, "shards": kept})
        self.manifest["shards"] = [
            e for e in self.manifest["shards"] if e["file"] not in self.damaged
        ]
        for name in self.damaged:
            (self.folder / name).unlink(missing_ok=True)

    def lists(self) -> dict[str, dict[str, Any]]:
        """The folder's manifests (``manifest.json`` and the ranks'), checked against the
        settings asked for, by file name. One that lists no shard holds nothing to keep (an
        earlier version wrote it before the first shard) and is written over."""
        found = {}
        for file in [self.folder / MANIFEST, *sorted(self.folder.glob("manifest-rank*.json"))]:
            if file.exists():
                manifest = read_manifest(self.folder, file.name)
                if not manifest["shards"]:
                    continue
                _check_same_settings(manifest, self.settings, file)
                found[file.name] = manifest
        return found

    def merged(self) -> dict[str, Any]:
        """One manifest listing every shard of every list once."""
        merged = json.loads(json.dumps(self.settings))
        names: set[str] = set()
        for file, manifest in self.lists().items():
            for key in ("vocab_size", "position_dims"):
                if merged[key] is None:
                    merged[key] = manifest[key]
                elif manifest[key] not in (None, merged[key]):
                    raise TeacherCacheError(
                        f"{self.folder / file}: {key} {manifest[key]}, but {merged[key]} in "
                        "the folder's other manifests"
                    )
            fresh = [entry for entry in manifest["shards"] if entry["file"] not in names]
            merged["shards"] += fresh
            names.update(entry["file"] for entry in fresh)
        return merged

    def check_vocabulary(self, logits: torch.Tensor, top_k: int) -> None:
        vocab = int(logits.shape[-1])
        if self.manifest["vocab_size"] is None:
            self.manifest["vocab_size"], self.manifest["position_dims"] = vocab, logits.dim() - 2
        elif self.manifest["vocab_size"] != vocab:
            raise TeacherCacheError(
                f"{self.folder}: the teacher's vocabulary is {vocab} here, "
                f"{self.manifest['vocab_size']} in earlier batches"
            )
        if top_k > vocab:
            raise TeacherCacheError(f"top_k={top_k} exceeds the vocabulary size {vocab}")

    def write(self, buffer: _ShardBuffer) -> None:
        """Write ``buffer`` as the next shard, then list it (both atomically)."""
        from safetensors.torch import save

        manifest = self.manifest
        codec = Codec(manifest["compression"], manifest["vocab_size"], manifest["top_k"])
        counts = torch.tensor([0, *buffer.counts], dtype=torch.int64)
        tensors = {
            "fingerprints": torch.frombuffer(
                bytearray(b"".join(buffer.fingerprints)), dtype=torch.uint8
            ).reshape(-1, FINGERPRINT_BYTES),
            "offsets": counts.cumsum(0),
            "positions": torch.cat(buffer.positions).to(torch.int64),
            **codec.encode(torch.cat(buffer.indices), torch.cat(buffer.values)),
            "logsumexp": torch.cat(buffer.logsumexp),
            "tail": torch.cat(buffer.tail),
        }
        number = len(manifest["shards"])
        while (name := f"{self.prefix}{number:05d}.safetensors") in self.taken:
            number += 1
        self.taken.add(name)
        with atomic_write(self.folder / name) as file:
            file.write(save({key: t.contiguous() for key, t in tensors.items()}))
        manifest["shards"].append(
            {"file": name, "examples": len(buffer), "positions": int(counts.sum())}
        )
        _write_manifest(self.folder, self.name, manifest)

    def finish(self) -> bool:
        """Once every rank is done, rank 0 lists all shards in ``manifest.json``; whether
        there were ranks' lists to merge."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
        lists = self.lists()
        merging = self.rank == 0 and any(name != MANIFEST for name in lists)
        if merging or (self.rank == 0 and MANIFEST not in lists):  # no data: an empty cache
            _write_manifest(self.folder, MANIFEST, self.merged())
        if self.world > 1:
            dist.barrier()  # no rank returns before the cache is whole
        return merging


def _check_cache_folder(folder: Path) -> None:
    """Refuse to write a cache over a file, or into a folder that holds other things."""
    if folder.exists() and not folder.is_dir():
        raise TeacherCacheError(
            f"{folder} is a file; give cache_teacher a folder (a new one, or a cache to resume)"
        )
    if not folder.is_dir() or any(folder.glob("manifest*.json")):
        return
    # A run killed before its first shard leaves at most shard files and temporary files, and
    # under torchrun another rank may be writing its first list (a temporary ".manifest-..." file).
    others = sorted(
        p.name
        for p in folder.iterdir()
        if not p.name.startswith(("shard-", ".shard-", ".manifest"))
    )
    if others:
        raise TeacherCacheError(
            f"{folder} is not empty and not a teacher cache (it holds {shown(others[:3])}); "
            "give cache_teacher a new folder or a cache to resume"
        )


def _check_same_settings(found: dict[str, Any], asked: dict[str, Any], file: Path) -> None:
    for key in ("top_k", "top_p", "temperature", "compression", "teacher"):
        if found.get(key) != asked[key]:
            raise TeacherCacheError(
                f"{file} lists a cache written with {key}={shown(found.get(key))}, not "
                f"{shown(asked[key])}; resume with the same teacher and arguments, or use "
                "another folder"
            )


def _write_manifest(folder: Path, name: str, manifest: dict[str, Any]) -> None:
    with atomic_write(folder / name) as file:
        file.write(json.dumps(manifest, indent=1).encode())


# ---- reading -----------------------------------------------------------------------------


class TeacherCache:
    """A teacher cache opened for reading: the manifest, checked, and an index from example
    fingerprints to their shard and row. Shards are memory-mapped (``safetensors.safe_open``)
    and read one example's rows at a time: a whole shard is never loaded. What is served is
    checked as it is read (see :meth:`rows`). With ``skip_damaged``, a listed shard that is
    missing or unreadable is left out and named in :attr:`damaged` (file name: what is wrong)
    instead of refused."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        manifest: dict[str, Any] | None = None,
        skip_damaged: bool = False,
    ) -> None:
        self.folder = Path(path)
        self.manifest = read_manifest(self.folder) if manifest is None else manifest
        self.vocab_size: int = self.manifest["vocab_size"] or 0
        self.top_k: int = self.manifest["top_k"]
        self.codec = Codec(self.manifest["compression"], self.vocab_size or 1, self.top_k)
        self.index: dict[bytes, tuple[int, int]] = {}
        self._shards: list[Any] = []
        self._offsets: list[torch.Tensor] = []
        self.damaged: dict[str, str] = {}
        for number, entry in enumerate(self.manifest["shards"]):
            try:
                self._open_shard(number, entry)
            except _DamagedShard as exc:
                if not skip_damaged:
                    raise TeacherCacheError(
                        f"{self.folder / entry['file']}: {exc}; run kd.cache_teacher (or kdcore "
                        "cache-teacher) again with the same teacher and arguments to re-write it"
                    ) from None
                self.damaged[entry["file"]] = str(exc)
                self._shards.append(None)
                self._offsets.append(torch.zeros(1, dtype=torch.int64))

    def _open_shard(self, number: int, entry: dict[str, Any]) -> None:
        from safetensors import safe_open

        file = self.folder / entry["file"]
        if not file.is_file():
            raise _DamagedShard("missing")
        try:
            shard = safe_open(str(file), framework="pt")
        except Exception as exc:  # safetensors raises its own errors on a truncated header
            raise _DamagedShard(f"not a readable safetensors shard ({exc})") from None
        n, positions = entry["examples"], entry["positions"]
        expected = {
            "fingerprints": [n, FINGERPRINT_BYTES],
            "offsets": [n + 1],
            "positions": [positions],
            **self.codec.shapes(positions),
            "logsumexp": [positions],
            "tail": [positions],
        }
        present = set(shard.keys())
        missing = [name for name in expected if name not in present]
        if missing:
            raise _DamagedShard(f"missing tensors {shown(missing)}")
        for name, shape in expected.items():
            found = shard.get_slice(name).get_shape()
            if list(found) != shape:
                raise _DamagedShard(
                    f"tensor {name!r} has shape {found}, the manifest implies {shape}"
                )
        try:
            offsets = shard.get_tensor("offsets")
            fingerprints = shard.get_tensor("fingerprints")
        except Exception as exc:  # a truncated file: the header promises more than is there
            raise _DamagedShard(f"truncated or corrupt ({exc})") from None
        if offsets[0] != 0 or offsets[-1] != positions or (offsets.diff() < 0).any():
            raise _DamagedShard(f"'offsets' do not run from 0 to {positions}")
        for row, fingerprint in enumerate(fingerprints.numpy()):
            self.index.setdefault(fingerprint.tobytes(), (number, row))
        self._shards.append(shard)
        self._offsets.append(offsets)

    def close(self) -> None:
        self._shards.clear()

    @property
    def written_from(self) -> dict[str, Any]:
        """What the cache depends on that a checkpoint trained from it records: the
        fingerprint of the teacher's weights and its vocabulary size."""
        return {
            "teacher_fingerprint": self.manifest["teacher"]["fingerprint"],
            "vocab_size": self.vocab_size,
        }

    @property
    def examples(self) -> int:
        return len(self.index)

    def rows(self, fingerprint: bytes) -> tuple[torch.Tensor, ...]:
        """``(positions, indices, logits, logsumexp, tail)`` of one cached example."""
        number, row = self.index[fingerprint]
        shard, offsets = self._shards[number], self._offsets[number]
        start, stop = int(offsets[row]), int(offsets[row + 1])
        file = self.folder / self.manifest["shards"][number]["file"]
        try:
            positions = shard.get_slice("positions")[start:stop]
            indices, values = self.codec.decode(
                lambda name, first, end: shard.get_slice(name)[first:end], start, stop
            )
            lse = shard.get_slice("logsumexp")[start:stop]
            tail = shard.get_slice("tail")[start:stop]
        except Exception as exc:
            raise TeacherCacheError(f"{file}: truncated or corrupt ({exc})") from None
        if indices.numel() and int(indices.max()) >= self.vocab_size:
            raise TeacherCacheError(
                f"{file}: vocabulary index {int(indices.max())} >= the vocabulary size "
                f"{self.vocab_size}"
            )
        problem = self._implausible(values, lse, tail)
        if problem:
            raise TeacherCacheError(
                f"{file}: example {row} (positions {start} to {stop - 1}) holds {problem}: the "
                "shard is damaged; cache the teacher again"
            )
        return positions, indices, values, lse, tail

    def _implausible(self, values: torch.Tensor, lse: torch.Tensor, tail: torch.Tensor) -> str:
        """What makes served rows no distribution (empty if nothing): a log-sum-exp that is not
        finite, a NaN or +inf value or tail, the largest value -inf, or a kept
        log-probability (value - logsumexp) or the tail's above 0 beyond the stored values'
        rounding. A tail of -inf is an empty tail (the kept entries hold all the mass)."""
        values, lse, tail = values.float(), lse.float(), tail.float()
        rounding = 2.0**-7 if self.manifest["compression"] == "bfloat16" else 1e-5
        slack = (lse.abs() * rounding + 1e-4)[:, None]
        checks = (
            ("a log-sum-exp that is not finite", ~lse.isfinite()),
            ("a NaN or +inf value", values.isnan() | (values == math.inf)),
            ("a NaN or +inf tail", tail.isnan() | (tail == math.inf)),
            ("no kept entry (the largest value is -inf)", values[:, :1] == -math.inf),
            (
                "a value above its log-sum-exp (a log-probability > 0)",
                values > lse[:, None] + slack,
            ),
            ("a tail above its log-sum-exp", tail[:, None] > lse[:, None] + slack),
        )
        return next((what for what, bad in checks if bool(bad.any())), "")

    def _why_not_cached(self, example: torch.Tensor, mask: torch.Tensor | None) -> str:
        """The likely cause of an example's absence, tried on this example only."""
        floating = example.is_floating_point() and example.dtype != torch.float32
        if floating and input_fingerprints(example[None].float())[0] in self.index:
            return (
                f"its inputs are {example.dtype}, cached as torch.float32; pass the inputs in "
                "the dtype they were cached in"
            )
        if mask is None and example.dim() == 1 and not example.is_floating_point():
            tokens = example.tolist()
            pad = tokens[-1]
            while tokens and tokens[-1] == pad:
                tokens.pop()
            if tokens and input_fingerprints(torch.tensor([tokens]))[0] in self.index:
                return (
                    f"without its trailing {pad!r} tokens it is cached: the batch is padded; "
                    "pass its attention_mask"
                )
        return (
            "cache every data set the teacher sees: the training data and, where a trainer "
            "evaluates with the teacher (KDTrainer with an eval_dataset), the eval set too; "
            "inputs must match those cached in dtype and tokens (and padding, without an "
            "attention_mask)"
        )

    def lookup(
        self, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> SparseTeacherOutput:
        """The cached distribution of the examples ``inputs`` (one per row): positions shaped
        as the teacher's logits were without the vocabulary (``[B]`` for a classifier,
        ``[B, S]`` for token ids ``[B, S]``), on the inputs' device. With an
        ``attention_mask``, each example's cached positions go to its attended tokens, in
        order, wherever the padding put them."""
        mask = attended(inputs, attention_mask)
        fingerprints = input_fingerprints(inputs, mask)
        lead_shape = tuple(inputs.shape[: 1 + (self.manifest["position_dims"] or 0)])
        batch, per_example = len(fingerprints), math.prod(lead_shape[1:])
        k = self.top_k
        indices = torch.zeros(batch, per_example, k, dtype=torch.int64)
        logits = torch.full((batch, per_example, k), -math.inf)
        lse = torch.zeros(batch, per_example)
        tail = torch.full((batch, per_example), -math.inf)
        covered = torch.zeros(batch, per_example, dtype=torch.bool)
        for i, fingerprint in enumerate(fingerprints):
            if fingerprint not in self.index:
                raise TeacherCacheError(
                    f"example {i} of the batch (input fingerprint {fingerprint.hex()}) is not "
                    f"in the teacher cache {self.folder} ({self.examples} examples): "
                    + self._why_not_cached(inputs[i], mask)
                )
            positions, idx, values, row_lse, row_tail = self.rows(fingerprint)
            places = mask[i].nonzero().squeeze(-1).cpu() if mask is not None else None
            length = len(places) if places is not None else per_example
            if positions.numel() and not 0 <= int(positions.min()) <= int(positions.max()) < length:
                raise TeacherCacheError(
                    f"{self.folder}: cached positions {int(positions.min())} to "
                    f"{int(positions.max())} of example {i} do not lie within its {length} "
                    "positions" + (" (attended tokens)" if places is not None else "")
                )
            if places is not None:
                positions = places[positions]
            indices[i, positions], logits[i, positions] = idx, values
            lse[i, positions], tail[i, positions] = row_lse, row_tail
            covered[i, positions] = True
        return SparseTeacherOutput(
            indices.reshape(*lead_shape, k),
            logits.reshape(*lead_shape, k),
            lse.reshape(lead_shape),
            tail.reshape(lead_shape),
            covered.reshape(lead_shape),
            vocab_size=self.vocab_size,
            temperature=self.manifest["temperature"],
            source=str(self.folder),
        ).to(inputs.device)


def read_manifest(folder: Path, name: str = MANIFEST) -> dict[str, Any]:
    """The checked manifest ``name`` of the cache in ``folder``."""
    from kdcore._strict_json import DuplicateKeyError, no_duplicate_keys

    file = folder / name
    try:
        manifest = json.loads(file.read_bytes(), object_pairs_hook=no_duplicate_keys)
    except FileNotFoundError:
        raise TeacherCacheError(f"{folder} is not a teacher cache: {name} is missing") from None
    except (ValueError, DuplicateKeyError, UnicodeDecodeError) as exc:
        raise TeacherCacheError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise TeacherCacheError(f"{file}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise TeacherCacheError(
            f"{file}: format version {shown(manifest.get('version'))}; this kdcore reads {VERSION}"
        )
    checks: dict[str, Any] = {
        "top_k": lambda v: type(v) is int and v >= 1,
        "vocab_size": lambda v: v is None or (type(v) is int and v >= 1),
        "position_dims": lambda v: v is None or (type(v) is int and v >= 0),
        "temperature": lambda v: type(v) in (int, float) and v > 0,
        "top_p": lambda v: v is None or (type(v) in (int, float) and 0 < v <= 1),
        "compression": lambda v: v in COMPRESSIONS,
        "teacher": lambda v: isinstance(v, dict) and isinstance(v.get("fingerprint"), str),
        "shards": lambda v: isinstance(v, list) and all(_is_shard_entry(e) for e in v),
    }
    bad_entries = [e for e in manifest.get("shards") or [] if not _is_shard_entry(e)]
    if isinstance(manifest.get("shards"), list) and bad_entries:
        raise TeacherCacheError(
            f"{file}: bad shard entry {shown(bad_entries[0])} (a shard is a .safetensors file in "
            "the cache's folder, with 'examples' and 'positions' counts)"
        )
    for key, check in checks.items():
        if key not in manifest or not check(manifest[key]):
            raise TeacherCacheError(f"{file}: bad or missing {key!r}: {shown(manifest.get(key))}")
    if manifest["shards"] and manifest["vocab_size"] is None:
        raise TeacherCacheError(f"{file}: has shards but no 'vocab_size'")
    return manifest


class _DamagedShard(Exception):
    """A listed shard that is missing or cannot be read as the manifest describes it."""


def _is_shard_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("file"), str)
        and entry["file"] == os.path.basename(entry["file"])
        and entry["file"].endswith(".safetensors")
        and all(
            type(entry.get(key)) is int and entry[key] >= 0 for key in ("examples", "positions")
        )
    )


def cache_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``kdcore inspect CACHE`` prints: the manifest, size, bytes per position, coverage
    and the damaged shards (``lines`` is the text form). Reads the manifest and the shards'
    headers and fingerprints."""
    cache = TeacherCache(path, skip_damaged=True)
    manifest = cache.manifest
    readable = [e for e in manifest["shards"] if e["file"] not in cache.damaged]
    size = sum((cache.folder / e["file"]).stat().st_size for e in readable)
    positions = sum(e["positions"] for e in readable)
    per_position = size / positions if positions else None
    lines = [
        f"teacher cache {cache.folder} (format version {manifest['version']})",
        f"  teacher {shown(manifest['teacher']['spec'])}",
        f"  teacher weights sha256 {manifest['teacher']['fingerprint']}",
        f"  vocab_size {manifest['vocab_size']} ({cache.codec.bits} index bits), top_k "
        f"{manifest['top_k']}, top_p {manifest['top_p']}, temperature {manifest['temperature']}, "
        f"compression {manifest['compression']}",
        f"  coverage: {cache.examples} examples, {positions} positions",
        f"  {len(manifest['shards'])} shards"
        + (f" ({len(cache.damaged)} damaged)" if cache.damaged else "")
        + f", {size} bytes"
        + (f", {per_position:.1f} bytes per position" if per_position else ""),
    ]
    listed = {entry["file"] for entry in manifest["shards"]}
    pending = [  # a distributed run under way, or killed before rank 0 merged the ranks' lists
        file.name
        for file in sorted(cache.folder.glob("manifest-rank*.json"))
        if any(e["file"] not in listed for e in read_manifest(cache.folder, file.name)["shards"])
    ]
    if pending:
        lines.append(
            f"  not served yet: shards listed in {', '.join(pending)} only (a torchrun run under "
            "way or killed; run it again to finish and merge)"
        )
    for name, what in cache.damaged.items():
        lines.append(f"  damaged: {name} is {what}, its examples are not served")
    if cache.damaged:
        lines.append(
            "  run kd.cache_teacher (or kdcore cache-teacher) again with the same teacher and "
            "arguments to re-write the damaged shards"
        )
    return {
        "path": str(cache.folder),
        "manifest": manifest,
        "examples": cache.examples,
        "positions": positions,
        "bytes": size,
        "bytes_per_position": per_position,
        "damaged": cache.damaged,
        "lines": lines,
    }
