"""What DCP's pickles describe, checked field by field.

:func:`~kdcore_builtins.restricted_pickle.evaluate_pickle` turns DCP's ``.metadata`` and each
tensor's ``data.pkl`` into inert records; this module holds the globals each may name and turns
those records into tensor locations, or refuses them.
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any, NamedTuple

import attrs
import torch

from kdcore_builtins.restricted_pickle import Global, Instance, Persistent, short


class ShapeError(Exception):
    pass


class Chunk(NamedTuple):
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    offset: int
    length: int


@attrs.frozen
class DcpTensor:
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]


def element_count(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


_DCP = "torch.distributed.checkpoint.metadata"
_DTYPE_NAMES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "uint16": torch.uint16,
    "uint32": torch.uint32,
    "uint64": torch.uint64,
    "bool": torch.bool,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
# torch.save's legacy typed storages (dtypes without one use UntypedStorage + _rebuild_tensor_v3)
_STORAGE_NAMES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_TORCH_DTYPES = frozenset(("torch", name) for name in _DTYPE_NAMES)
METADATA_GLOBALS = frozenset(
    {
        (_DCP, "Metadata"),
        (_DCP, "TensorStorageMetadata"),
        (_DCP, "BytesStorageMetadata"),
        (_DCP, "ChunkStorageMetadata"),
        (_DCP, "TensorProperties"),
        (_DCP, "_MEM_FORMAT_ENCODING"),
        (_DCP, "MetadataIndex"),
        (_DCP, "StorageMeta"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch", "strided"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "PureWindowsPath"),
        *_TORCH_DTYPES,
    }
)
TENSOR_GLOBALS = frozenset(
    {
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch.storage", "UntypedStorage"),
        ("collections", "OrderedDict"),
        *(("torch", name) for name in _STORAGE_NAMES),
        *_TORCH_DTYPES,
    }
)


# ---------------------------------------------------- checking what the pickles describe
def _object_state(value: Any, module: str, name: str, what: str) -> dict[str, Any]:
    """The attribute dict of a dataclass pickled as NEWOBJ(cls, ()) + BUILD(dict)."""
    if not (
        isinstance(value, Instance)
        and value.cls == (module, name)
        and value.args == ()
        and isinstance(value.state, dict)
        and all(isinstance(key, str) for key in value.state)
    ):
        raise ShapeError(f"{what} is not a {name}")
    return value.state  # type: ignore[no-any-return]


def _called(value: Any, module: str, name: str, what: str) -> tuple[Any, ...]:
    if not (isinstance(value, Instance) and value.cls == (module, name) and not value.built):
        raise ShapeError(f"{what} is not {module}.{name}(...)")
    return value.args


_MAX_INT = 2**63 - 1  # torch's sizes, strides and offsets are int64


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_INT:
        raise ShapeError(f"{what} must be a non-negative 64-bit integer, got {short(value)}")
    return value


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)):
        raise ShapeError(f"{what} must be a sequence of integers")
    return tuple(_int(item, what) for item in value)


def _size(value: Any, what: str) -> tuple[int, ...]:
    args = _called(value, "torch", "Size", what)
    if len(args) != 1:
        raise ShapeError(f"{what} is a malformed torch.Size")
    return _ints(args[0], what)


def _dtype(value: Any, what: str) -> torch.dtype:
    if not (isinstance(value, Global) and value.module == "torch" and value.name in _DTYPE_NAMES):
        raise ShapeError(f"{what} is not a dtype kdcore reads")
    return _DTYPE_NAMES[value.name]


def _properties_dtype(value: Any, what: str) -> torch.dtype:
    state = value.state if isinstance(value, Instance) else None
    if isinstance(value, Instance) and value.cls == (_DCP, "TensorProperties") and value.args == ():
        if isinstance(state, tuple) and len(state) == 5:  # TensorProperties.__getstate__
            dtype, layout = state[0], state[1]
        elif isinstance(state, dict):  # older torch: the plain attribute dict
            dtype, layout = state.get("dtype"), state.get("layout")
        else:
            raise ShapeError(f"{what} is malformed")
        strided = layout == Global("torch", "strided") or (
            isinstance(layout, Instance)
            and layout.cls == ("torch.serialization", "_get_layout")
            and layout.args == ("torch.strided",)
        )
        if not strided:
            raise ShapeError(f"{what}: only strided (dense) tensors are read")
        return _dtype(dtype, f"{what}.dtype")
    raise ShapeError(f"{what} is not a TensorProperties")


def dcp_entries(value: Any) -> dict[str, DcpTensor]:
    metadata = _object_state(value, _DCP, "Metadata", "the pickled object")
    version = metadata.get("version")
    if version is not None and not (isinstance(version, str) and version.startswith("1.")):
        raise ShapeError(f"DCP format version {short(version)} (kdcore reads 1.x)")
    tensors = metadata.get("state_dict_metadata")
    storage = metadata.get("storage_data")
    if not isinstance(tensors, dict) or not isinstance(storage, dict):
        raise ShapeError("state_dict_metadata and storage_data must be dicts")
    locations: dict[tuple[str, tuple[int, ...]], tuple[str, int, int]] = {}
    for key, info in storage.items():
        index = _object_state(key, _DCP, "MetadataIndex", "a storage_data key")
        fqn = index.get("fqn")
        if not isinstance(fqn, str):
            raise ShapeError("a storage_data key has no fqn")
        offset = _size(index.get("offset"), f"storage_data[{fqn!r}].offset")
        where = _object_state(
            info, "torch.distributed.checkpoint.filesystem", "_StorageInfo", f"storage of {fqn!r}"
        )
        if where.get("transform_descriptors"):
            raise ShapeError(
                f"{fqn!r} is stored through stream transforms "
                f"{short(where['transform_descriptors'])}, which kdcore does not read"
            )
        relative_path = where.get("relative_path")
        if not isinstance(relative_path, str):
            raise ShapeError(f"storage of {fqn!r} has no relative_path")
        if (fqn, offset) in locations:
            raise ShapeError(f"chunk {list(offset)} of {fqn!r} is stored twice")
        locations[(fqn, offset)] = (
            relative_path,
            _int(where.get("offset"), f"storage of {fqn!r}: offset"),
            _int(where.get("length"), f"storage of {fqn!r}: length"),
        )
    entries: dict[str, DcpTensor] = {}
    for fqn, item in tensors.items():
        if not isinstance(fqn, str):
            raise ShapeError("a state_dict_metadata key is not a string")
        if isinstance(item, Instance) and item.cls == (_DCP, "BytesStorageMetadata"):
            raise ShapeError(f"entry {fqn!r} is pickled bytes, not a tensor")
        state = _object_state(item, _DCP, "TensorStorageMetadata", f"entry {fqn!r}")
        dtype = _properties_dtype(state.get("properties"), f"entry {fqn!r}.properties")
        shape = _size(state.get("size"), f"entry {fqn!r}.size")
        raw_chunks = state.get("chunks")
        if not isinstance(raw_chunks, list):
            raise ShapeError(f"entry {fqn!r}.chunks is not a list")
        chunks = []
        for number, raw in enumerate(raw_chunks):
            what = f"entry {fqn!r}.chunks[{number}]"
            chunk = _object_state(raw, _DCP, "ChunkStorageMetadata", what)
            offsets = _size(chunk.get("offsets"), f"{what}.offsets")
            sizes = _size(chunk.get("sizes"), f"{what}.sizes")
            if len(offsets) != len(shape) or len(sizes) != len(shape):
                raise ShapeError(f"{what} has another rank than the tensor")
            if any(o + s > n for o, s, n in zip(offsets, sizes, shape, strict=True)):
                raise ShapeError(f"{what} lies outside the tensor's shape {list(shape)}")
            if (fqn, offsets) not in locations:
                raise ShapeError(f"{what} has no storage_data entry")
            chunks.append(Chunk(offsets, sizes, *locations[(fqn, offsets)]))
        _check_cover(fqn, shape, chunks)
        entries[fqn] = DcpTensor(dtype, shape, tuple(chunks))
    return entries


_MAX_COVER_CORNERS = 2**20  # a 2-D split into 250,000 chunks; a second or two


def _check_cover(fqn: str, shape: tuple[int, ...], chunks: list[Chunk]) -> None:
    """The chunks tile the tensor: no overlaps, and together exactly its size.

    In linear time, by corners rather than by comparing every pair: a box's indicator is the
    signed sum of the orthants at its corners (+ where an even number of coordinates are upper
    bounds, - where odd), and that sum is unique, so the chunks (all inside the tensor, checked
    before) tile it exactly when their signed corners add up to the tensor's own. Dimensions that
    every chunk spans in full factor out, so a chunk has 2**(split dimensions) corners.
    """
    if sum(element_count(chunk.sizes) for chunk in chunks) != element_count(shape) or (
        not chunks and element_count(shape)
    ):
        raise ShapeError(f"the chunks of {fqn!r} do not cover its shape {list(shape)}")
    if not element_count(shape):
        return  # and so every chunk is empty
    nonempty = [chunk for chunk in chunks if element_count(chunk.sizes)]
    split = [d for d in range(len(shape)) if any(c.sizes[d] != shape[d] for c in nonempty)]
    if len(nonempty) << len(split) > _MAX_COVER_CORNERS:
        raise ShapeError(
            f"{fqn!r} is split along {len(split)} dimensions into {len(nonempty)} chunks, more "
            f"than kdcore checks ({_MAX_COVER_CORNERS} chunk corners)"
        )
    whole = Chunk((0,) * len(shape), shape, "", 0, 0)
    counts: dict[tuple[int, ...], int] = {}
    for box, sign in [(whole, -1), *((chunk, 1) for chunk in nonempty)]:
        bounds = [((box.offsets[d], 1), (box.offsets[d] + box.sizes[d], -1)) for d in split]
        for corner in itertools.product(*bounds):
            point = tuple(x for x, _ in corner)
            counts[point] = counts.get(point, 0) + sign * math.prod(s for _, s in corner)
    if any(counts.values()):
        raise ShapeError(
            f"the chunks of {fqn!r} overlap (their sizes add up to its shape {list(shape)}, so "
            "they also leave part of it uncovered)"
        )


def rebuilt_tensor(
    value: Any,
) -> tuple[torch.dtype, str, int, torch.dtype, int, tuple[int, ...], tuple[int, ...]]:
    """(storage dtype, storage key, storage numel, dtype, storage offset, size, stride)."""
    if not isinstance(value, Instance) or value.built:
        raise ShapeError("the archive does not hold one tensor")
    if value.cls == ("torch._utils", "_rebuild_tensor_v2") and len(value.args) in (6, 7):
        storage, offset, size, stride, _, hooks, *rest = value.args
        dtype = None
    elif value.cls == ("torch._utils", "_rebuild_tensor_v3") and len(value.args) in (7, 8):
        storage, offset, size, stride, _, hooks, dtype_value, *rest = value.args
        dtype = _dtype(dtype_value, "the tensor's dtype")
    else:
        raise ShapeError("the archive does not hold one tensor")
    if _called(hooks, "collections", "OrderedDict", "backward hooks") != () or rest not in (
        [],
        [None],
        [{}],
    ):
        raise ShapeError("the tensor carries hooks or metadata")
    if not (
        isinstance(storage, Persistent)
        and isinstance(storage.pid, tuple)
        and len(storage.pid) == 5
        and storage.pid[0] == "storage"
        and isinstance(storage.pid[1], Global)
        and isinstance(storage.pid[2], str)
        and re.fullmatch(r"\d+", storage.pid[2])
    ):
        raise ShapeError("the tensor's storage reference is malformed")
    storage_class = storage.pid[1]
    if storage_class == ("torch.storage", "UntypedStorage") and dtype is not None:
        storage_dtype = torch.uint8
    elif storage_class.module == "torch" and storage_class.name in _STORAGE_NAMES and dtype is None:
        storage_dtype = dtype = _STORAGE_NAMES[storage_class.name]
    else:
        raise ShapeError(f"unexpected storage {storage_class.module}.{storage_class.name}")
    numel = _int(storage.pid[4], "the storage size")
    size, stride = _ints(size, "the tensor's size"), _ints(stride, "the tensor's stride")
    if len(size) != len(stride):
        raise ShapeError("size and stride differ in length")
    return storage_dtype, storage.pid[2], numel, dtype, _int(offset, "storage offset"), size, stride
