"""Reading and writing the safetensors format, streaming, without NumPy and without pickle.

Layout: an 8-byte little-endian header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}``), then the data.
Writing streams one tensor at a time, so saving needs no second copy of the model; reading
checks the whole header against the file size before allocating anything, and can read a
tensor straight into an existing parameter.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch

from kdcore.plugin import (
    CheckpointError,
    CheckpointFormatError,
    DuplicateKeyError,
    TensorInfo,
    no_duplicate_keys,
    open_regular,
)

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024
HEADER_LENGTH_BYTES = 8


def _check_byte_order() -> None:
    if sys.byteorder != "little":
        raise RuntimeError("kdcore reads and writes safetensors on little-endian machines only")


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying (NumPy is not needed)."""
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b"")
    buffer = (ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())
    return memoryview(buffer).cast("B")


def header_for(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in DTYPE_CODES:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which safetensors lacks")
        if tensor.layout != torch.strided:
            raise TypeError(f"tensor {name!r} is sparse; densify it before saving")
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": DTYPE_CODES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return encoded + b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned


def write(
    file: IO[bytes], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    """Stream ``tensors`` to ``file``; each is copied to the CPU on its own, if at all."""
    _check_byte_order()
    header = header_for(tensors, metadata)
    file.write(struct.pack("<Q", len(header)))
    file.write(header)
    for tensor in tensors.values():
        cpu = tensor.detach().to("cpu").contiguous()
        file.write(byte_view(cpu))


class SafetensorsFile:
    """One safetensors file, its header checked in full before any tensor is read.

    Everything is read through one handle: a save that replaces the file meanwhile (a rename)
    leaves this reader on the file it opened. Raises ``FileNotFoundError`` when there is none.
    """

    def __init__(self, path: Path) -> None:
        _check_byte_order()
        self.path = path
        self.files = [path]  # what kdcore inspect reports
        self._file = open_regular(path)
        try:
            self.metadata, self.entries = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _fail(self, problem: str) -> CheckpointFormatError:
        return CheckpointFormatError(self.path, problem)

    def _read_header(
        self,
    ) -> tuple[dict[str, str], dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]]:
        size = os.fstat(self._file.fileno()).st_size  # of the file opened, not the path's now
        if size < HEADER_LENGTH_BYTES:
            raise self._fail(f"is {size} bytes long, too short for a safetensors file")
        (length,) = struct.unpack("<Q", self._file.read(HEADER_LENGTH_BYTES))
        if length > size - HEADER_LENGTH_BYTES:
            raise self._fail(
                f"header length {length} is larger than the file ({size} bytes): truncated or "
                "not a safetensors file"
            )
        if length > MAX_HEADER_BYTES:
            raise self._fail(f"header length {length} exceeds {MAX_HEADER_BYTES} bytes")
        try:
            header = json.loads(self._file.read(length), object_pairs_hook=no_duplicate_keys)
        except DuplicateKeyError as exc:
            raise self._fail(f"duplicate tensor name {exc.args[0]!r} in the header") from None
        except (UnicodeDecodeError, ValueError) as exc:
            raise self._fail(f"header is not valid JSON ({exc})") from None
        except RecursionError:  # json's answer to deep nesting is not a ValueError
            raise self._fail("header JSON nests too deeply") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise self._fail("header __metadata__ must map strings to strings")
        data_size = size - HEADER_LENGTH_BYTES - length
        entries = {name: self._entry(name, value, data_size) for name, value in header.items()}
        spans = sorted((begin, end) for _, _, begin, end in entries.values())
        position = 0
        for begin, end in spans:
            if begin != position:
                raise self._fail("tensor data overlaps or leaves gaps (offsets are not contiguous)")
            position = end
        if position != data_size:
            raise self._fail(f"holds {data_size} data bytes but its tensors cover {position}")
        self._data_start = HEADER_LENGTH_BYTES + length
        return metadata, entries

    def _entry(
        self, name: str, value: Any, data_size: int
    ) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
            raise self._fail(f"tensor {name!r}: entry must have dtype, shape and data_offsets")
        dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
        if dtype not in DTYPES:
            raise self._fail(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise self._fail(f"tensor {name!r}: shape must be a list of non-negative ints")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise self._fail(
                f"tensor {name!r}: data_offsets must be [begin, end] with begin <= end"
            )
        begin, end = offsets
        expected = math.prod(shape) * torch.empty((), dtype=DTYPES[dtype]).element_size()
        if end - begin != expected:
            raise self._fail(
                f"tensor {name!r}: {end - begin} bytes stored for shape {shape} of {dtype} "
                f"({expected} bytes needed)"
            )
        if end > data_size:
            raise self._fail(
                f"tensor {name!r} ends at data byte {end} but the file holds {data_size}: truncated"
            )
        return DTYPES[dtype], tuple(shape), begin, end

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return {
            name: TensorInfo(dtype, shape) for name, (dtype, shape, _, _) in self.entries.items()
        }

    def load(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        dtype, shape, begin, end = self.entries[name]
        fits = (
            out is not None
            and out.dtype == dtype
            and tuple(out.shape) == shape
            and out.device.type == "cpu"
            and out.is_contiguous()
        )
        # Straight into the parameter when it can hold the bytes as they are: one copy.
        target = out if out is not None and fits else torch.empty(shape, dtype=dtype)
        self._file.seek(self._data_start + begin)
        if self._file.readinto(byte_view(target)) != end - begin:  # shrank since the check
            raise self._fail(f"tensor {name!r} is truncated")
        if out is not None and not fits:
            out.copy_(target)
            return out
        return target

    def close(self) -> None:
        self._file.close()


def looks_like_safetensors(path: Path) -> bool:
    """A regular file whose header, after the 8 length bytes, opens a JSON object."""
    try:
        with open_regular(path) as file:
            head = file.read(HEADER_LENGTH_BYTES + 1)
    except (OSError, CheckpointError):
        return False
    return len(head) == HEADER_LENGTH_BYTES + 1 and head[-1:] == b"{"
