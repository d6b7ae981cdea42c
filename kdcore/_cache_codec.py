"""How a teacher cache stores each position's kept entries (vocabulary indices and scaled logits).

``float32`` and ``bfloat16`` pack each index at ceil(log2 V) bits and store the values as they
are. ``compressed`` stores at most 24 bits per entry up to V = 2**18 (k = 64), index and value:

- indices as a sorted set, Elias-Fano coded: with ``L = floor(log2(V / k))``, each index's low
  ``L`` bits packed, its high part as one bit set at ``(index >> L) + rank`` in a bit vector of
  ``k + (V >> L) + 1`` bits: ``L + 2`` bits per index or so, and a fixed size per position, so
  positions stay randomly accessible (13.2 bits at V = 151,936, 11.0 at 32,000);
- values as 9-bit codes of ``(top - value) / step``, ``top`` (the position's largest value,
  float32, exact) and ``step`` (bfloat16) per position; code 511 marks an entry ``top_p`` left
  out. Each value is within ``step / 2`` of the original, ``step`` being 1/510 of the position's
  range of kept values.

Decoded entries come back sorted by value, largest first, as the lossless modes keep them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Slice = Callable[[str, int, int], torch.Tensor]  # (tensor name, first, stop) -> that slice

VALUE_BITS = 9
_MISSING = (1 << VALUE_BITS) - 1


def index_bits(vocab_size: int) -> int:
    """Bits per vocabulary index: ceil(log2 V), at least 1."""
    return max(1, math.ceil(math.log2(vocab_size)))


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Non-negative integers below ``2**bits`` packed little-endian into a uint8 tensor."""
    import numpy as np

    # Each value's low bytes, their low ``bits`` bits, one stream: uint8 work only (an int64
    # per bit took 2.5 % of the teacher's forward at V = 8,000).
    flat = values.reshape(-1).to(torch.int64).numpy().astype("<u8")
    low_bytes = flat.view(np.uint8).reshape(-1, 8)[:, : -(-bits // 8)]
    stream = np.unpackbits(low_bytes, axis=1, count=bits, bitorder="little")
    return torch.from_numpy(np.packbits(stream, bitorder="little"))


def unpack_bits(read: Slice, name: str, bits: int, first: int, count: int) -> torch.Tensor:
    """Entries ``first .. first + count`` of the stream ``name`` written by :func:`pack_bits`,
    reading only the bytes that hold them."""
    start, stop = first * bits // 8, -(-(first + count) * bits // 8)
    packed = read(name, start, stop)
    skip = first * bits % 8
    stream = (packed[:, None].to(torch.int64) >> torch.arange(8)) & 1
    stream = stream.reshape(-1)[skip : skip + count * bits].reshape(count, bits)
    return (stream << torch.arange(bits)).sum(-1)


def packed_bytes(count: int, bits: int) -> int:
    return -(-count * bits // 8)


class Codec:
    """One storage of ``[P, k]`` indices and values (see the module docstring)."""

    def __init__(self, compression: str, vocab_size: int, k: int) -> None:
        self.compression, self.vocab_size, self.k = compression, vocab_size, k
        self.bits = index_bits(vocab_size)
        self.low = max(0, math.floor(math.log2(max(vocab_size / k, 1))))
        self.high = k + (vocab_size >> self.low) + 1

    def shapes(self, positions: int) -> dict[str, list[int]]:
        """The shard tensors of ``positions`` positions and their shapes."""
        k = self.k
        if self.compression != "compressed":
            return {
                "indices": [packed_bytes(positions * k, self.bits)],
                "values": [positions, k],
            }
        return {
            "index_low": [packed_bytes(positions * k, self.low)],
            "index_high": [packed_bytes(positions * self.high, 1)],
            "values": [packed_bytes(positions * k, VALUE_BITS)],
            "value_top": [positions],
            "value_step": [positions],
        }

    def encode(self, indices: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.compression == "float32":
            return {"indices": pack_bits(indices, self.bits), "values": values.float()}
        if self.compression == "bfloat16":
            return {"indices": pack_bits(indices, self.bits), "values": values.bfloat16()}
        order = indices.argsort(dim=-1, stable=True)
        indices, values = indices.gather(-1, order), values.gather(-1, order)
        kept = values.isfinite()
        top = values.amax(-1)
        bottom = values.masked_fill(~kept, math.inf).amin(-1)
        step = ((top - bottom) / (_MISSING - 1)).clamp(min=1e-30).bfloat16()
        codes = ((top[:, None] - values) / step.float()[:, None]).round().clamp(0, _MISSING - 1)
        codes = codes.masked_fill(~kept, _MISSING).to(torch.int64)
        rank = torch.arange(self.k)
        high = torch.zeros(indices.shape[0], self.high, dtype=torch.int64)
        high.scatter_(-1, (indices >> self.low) + rank, 1)
        return {
            "index_low": pack_bits(indices & ((1 << self.low) - 1), self.low)
            if self.low
            else torch.zeros(0, dtype=torch.uint8),
            "index_high": pack_bits(high, 1),
            "values": pack_bits(codes, VALUE_BITS),
            "value_top": top.float(),
            "value_step": step,
        }

    def decode(self, read: Slice, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices (int64) and values (float32) of positions ``start .. stop``."""
        count, k = stop - start, self.k
        if self.compression != "compressed":
            indices = unpack_bits(read, "indices", self.bits, start * k, count * k)
            return indices.reshape(count, k), read("values", start, stop).float()
        low = (
            unpack_bits(read, "index_low", self.low, start * k, count * k).reshape(count, k)
            if self.low
            else torch.zeros(count, k, dtype=torch.int64)
        )
        bits = unpack_bits(read, "index_high", 1, start * self.high, count * self.high)
        ones = bits.reshape(count, self.high).nonzero()
        if ones.shape[0] != count * k:
            raise ValueError(f"an index bit vector holds {ones.shape[0]} indices, not {count * k}")
        high = ones[:, 1].reshape(count, k) - torch.arange(k)
        indices = (high << self.low) | low
        codes = unpack_bits(read, "values", VALUE_BITS, start * k, count * k).reshape(count, k)
        top = read("value_top", start, stop).float()[:, None]
        step = read("value_step", start, stop).float()[:, None]
        values = (top - codes * step).masked_fill(codes == _MISSING, -math.inf)
        order = values.argsort(dim=-1, descending=True, stable=True)
        return indices.gather(-1, order), values.gather(-1, order)
