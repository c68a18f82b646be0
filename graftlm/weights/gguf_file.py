"""A GGUF file, memory-mapped and parsed by gguf-py, checked before anything trusts it.

gguf-py does the parsing. `_CheckedReader` subclasses its `GGUFReader` for two things:

- Bounds. Every read, count and length is checked against the file's size before gguf-py acts on
  it, so damaged input fails fast with a message that says where, instead of an IndexError from deep
  inside numpy, a loop over a bogus 2**64 element count, or a tensor view that runs off the file.
  The work done is at most proportional to the file's size.
- Speed. gguf-py builds one numpy view (two for strings) per array element: 20-70 s for Gemma 3's
  262,144-token vocabulary. Here an array is one view (numbers) or one pass over the length
  prefixes (strings); the per-element views gguf-py lists in `ReaderField.parts` are made only when
  indexed, and `contents()` decodes on demand, giving the same values as gguf-py's.

`GGUFFile` turns any failure into a GGUFFormatError naming the file (and the key or tensor).
"""

from __future__ import annotations

import copy
import logging
import os
import struct
import sys
from array import array as pyarray
from collections.abc import Callable, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGUFValueType

from graftlm.errors import GGUFFormatError

log = logging.getLogger(__name__)

# Metadata arrays that are large and only the tokenizer needs; they are read on demand.
_LAZY_ARRAYS = frozenset(
    {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}
)
_MAX_DIMS = 4  # GGML_MAX_DIMS
_HEADER_BYTES = 24  # magic, version, tensor count, KV count
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset
_MIN_ITEM_BYTES = {GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}
# What parsing damaged input can raise from inside gguf-py or numpy.
_PARSE_ERRORS = (ValueError, IndexError, KeyError, struct.error, OverflowError, TypeError)


class _Damaged(ValueError):
    """Inconsistent input found by the reader; GGUFFile adds the file's path."""


def _utf8(raw: np.ndarray, what: str) -> str:
    try:
        return str(raw.tobytes(), encoding="utf-8")
    except UnicodeDecodeError:
        raise _Damaged(f"{what} is not valid UTF-8") from None


class _ArrayParts(Sequence):
    """The `parts` gguf-py lists for an array field, each element's view made when indexed.

    gguf-py's layout: the head (key length, key bytes, value type, item type, count), then per
    item one view (numbers) or two (string length, string bytes); `data` indexes the item views.
    """

    per_item = 1

    def __init__(self, head: list[np.ndarray], count: int):
        self.head = head
        self.count = count

    def with_head(self, extra: list[np.ndarray]) -> _ArrayParts:
        other = copy.copy(self)
        other.head = [*extra, *self.head]
        return other

    def __len__(self) -> int:
        return len(self.head) + self.per_item * self.count

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        i = range(len(self))[index]  # normalizes negative indices, raises IndexError
        if i < len(self.head):
            return self.head[i]
        item, k = divmod(i - len(self.head), self.per_item)
        return self._part(item, k)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def data(self) -> range:
        """Indices of the item views (strings: their bytes), as gguf-py's `ReaderField.data`."""
        return range(len(self.head) + self.per_item - 1, len(self), self.per_item)

    def _part(self, item: int, k: int) -> np.ndarray:
        raise NotImplementedError

    def values(self, index: int | slice) -> Any:
        raise NotImplementedError


class _NumberParts(_ArrayParts):
    def __init__(self, head: list[np.ndarray], values: np.ndarray):
        super().__init__(head, len(values))
        self.array = values

    def _part(self, item: int, k: int) -> np.ndarray:
        return self.array[item : item + 1]

    def values(self, index: int | slice) -> Any:
        return self.array[index].tolist()


class _StringParts(_ArrayParts):
    per_item = 2

    def __init__(
        self,
        head: list[np.ndarray],
        get: Callable[..., np.ndarray],
        starts: np.ndarray,
        lengths: np.ndarray,
        blob: np.ndarray,
        base: int,
    ):
        super().__init__(head, len(starts))
        self.get, self.starts, self.lengths = get, starts, lengths
        self.blob, self.base = blob, base  # the strings' bytes, starting at file offset `base`

    def _part(self, item: int, k: int) -> np.ndarray:
        start = int(self.starts[item])
        return self.get(start, np.uint64) if k == 0 else self.get(start + 8, np.uint8, self.lengths[item])

    def values(self, index: int | slice) -> Any:
        items = range(self.count)[index]
        if isinstance(items, int):
            first = int(self.starts[items]) + 8 - self.base
            return self._decode(self.blob[first : first + int(self.lengths[items])].tobytes(), items)
        raw = self.blob.tobytes()
        firsts = (self.starts[index] + (8 - self.base)).tolist()
        return [self._decode(raw[a : a + n], a) for a, n in zip(firsts, self.lengths[index].tolist())]

    def _decode(self, raw: bytes, where: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Damaged(f"a string at byte {self.base + where - 8} is not valid UTF-8") from None


class _ArrayField(gguf.ReaderField):
    """A ReaderField over `_ArrayParts`: `contents()` decodes straight from the file's bytes."""

    __slots__ = ()

    def contents(self, index_or_slice: int | slice = slice(None)) -> Any:
        return self.parts.values(index_or_slice)  # type: ignore[attr-defined]


class _CheckedReader(gguf.GGUFReader):
    """gguf-py's GGUFReader with every read bounds-checked and arrays parsed in one pass."""

    def _get(self, offset: int, dtype, count: int = 1, override_order=None) -> np.ndarray:
        count = int(count)
        end = int(offset) + np.dtype(dtype).itemsize * count
        if count < 0 or end > len(self.data):
            raise _Damaged(
                f"a value at byte {offset} ({count} x {np.dtype(dtype).name}) runs past the end of the "
                f"file ({len(self.data)} bytes): truncated or damaged"
            )
        return super()._get(offset, dtype, count, override_order)

    def _room(self, offset: int) -> int:
        return len(self.data) - offset

    def _build_fields(self, offs: int, count: int) -> int:
        count = int(count)
        if count * _MIN_KV_BYTES > self._room(offs):
            raise _Damaged(
                f"the header claims {count} metadata entries, more than the rest of the file "
                f"({self._room(offs)} bytes) can hold: truncated or damaged"
            )
        for _ in range(count):
            orig_offs = offs
            kv_klen, kv_kdata = self._get_str(offs)
            key = _utf8(kv_kdata, f"the metadata key at byte {orig_offs}")
            if key in self.fields:
                raise _Damaged(f"metadata key '{key}' appears twice")
            offs += int(kv_klen.nbytes + kv_kdata.nbytes)
            raw_kv_type = self._get(offs, np.uint32)
            offs += int(raw_kv_type.nbytes)
            head = [kv_klen, kv_kdata, raw_kv_type]
            try:
                size, parts, idxs, types = self._get_field_parts(offs, raw_kv_type[0])
            except _Damaged as exc:
                raise _Damaged(f"metadata '{key}': {exc}") from None
            if isinstance(parts, _ArrayParts):
                parts = parts.with_head(head)
                field: gguf.ReaderField = _ArrayField(orig_offs, key, parts, parts.data(), types)  # type: ignore[arg-type]
            else:
                field = gguf.ReaderField(orig_offs, key, head + parts, [i + len(head) for i in idxs], types)
            self._push_field(field, skip_sum=True)
            offs += size
        return offs

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        try:
            gtype = GGUFValueType(int(raw_type))
        except ValueError:
            raise _Damaged(f"unknown value type {int(raw_type)}") from None
        if gtype != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        try:
            itype = GGUFValueType(int(raw_itype[0]))
        except ValueError:
            raise _Damaged(f"array of unknown value type {int(raw_itype[0])}") from None
        count, start = int(alen[0]), orig_offs + 12
        item_bytes = _MIN_ITEM_BYTES.get(itype) or np.dtype(self.gguf_scalar_to_np[itype]).itemsize
        if count * item_bytes > self._room(start):
            raise _Damaged(
                f"an array of {count} {itype.name.lower()} values at byte {orig_offs} runs past the end "
                f"of the file ({len(self.data)} bytes): truncated or damaged"
            )
        if itype == GGUFValueType.ARRAY:  # nested: gguf-py's loop, its count now bounded by the file
            return super()._get_field_parts(orig_offs, raw_type)
        head = [raw_itype, alen]
        types = [gtype, itype] if count else [gtype]  # gguf-py takes the item type from item 0
        parts: _ArrayParts
        if itype == GGUFValueType.STRING:
            starts, end = self._string_starts(start, count)
            lengths = np.diff(np.append(starts, end)) - 8
            parts = _StringParts(head, self._get, starts, lengths, self.data[start:end], start)
        else:
            parts = _NumberParts(head, self._get(start, self.gguf_scalar_to_np[itype], count))
            end = start + parts.array.nbytes
        return end - orig_offs, parts, parts.data(), types

    def _string_starts(self, start: int, count: int) -> tuple[np.ndarray, int]:
        """Offsets of `count` length-prefixed strings from `start`, and the offset after the last."""
        order = "=" if self.byte_order == "I" else (">" if sys.byteorder == "little" else "<")
        unpack = struct.Struct(order + "Q").unpack_from
        buf, size, pos = memoryview(self.data), len(self.data), start
        starts = pyarray("q")
        for _ in range(count):
            if pos + 8 > size:
                break
            starts.append(pos)
            pos += 8 + unpack(buf, pos)[0]
        if len(starts) < count or pos > size:
            raise _Damaged(
                f"an array of {count} strings at byte {start} runs past the end of the file "
                f"({size} bytes): truncated or damaged"
            )
        return np.frombuffer(starts, dtype=np.int64), pos

    def _build_tensor_info(self, offs: int, count: int):
        count = int(count)
        if count * _MIN_TENSOR_INFO_BYTES > self._room(offs):
            raise _Damaged(
                f"the header claims {count} tensors, more than the rest of the file "
                f"({self._room(offs)} bytes) can hold: truncated or damaged"
            )
        return super()._build_tensor_info(offs, count)

    def _get_tensor_info_field(self, orig_offs: int) -> gguf.ReaderField:
        name_len, name_data = self._get_str(orig_offs)
        name = _utf8(name_data, f"the tensor name at byte {orig_offs}")
        offs = orig_offs + int(name_len.nbytes + name_data.nbytes)
        n_dims = int(self._get(offs, np.uint32)[0])
        if not 1 <= n_dims <= _MAX_DIMS:
            raise _Damaged(f"tensor '{name}' has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)")
        if 4 + 8 * n_dims + 4 + 8 > self._room(offs):
            raise _Damaged(f"the tensor table is truncated at tensor '{name}'")
        return super()._get_tensor_info_field(orig_offs)

    def _build_tensors(self, start_offs: int, fields: list[gguf.ReaderField]) -> None:
        seen: set[str] = set()
        spans = []
        for field in fields:
            spans.append(self._check_tensor_info(start_offs, field))
            if field.name in seen:
                raise _Damaged(f"tensor '{field.name}' appears twice")
            seen.add(field.name)
        spans.sort()
        for (_, end, name), (start, _, next_name) in zip(spans, spans[1:]):
            if start < end:
                raise _Damaged(f"the data of tensors '{name}' and '{next_name}' overlap")
        super()._build_tensors(start_offs, fields)

    def _check_tensor_info(self, start_offs: int, field: gguf.ReaderField) -> tuple[int, int, str]:
        """The tensor's byte span, after checking its type, shape and place in the file."""
        _, _, _, dims, raw_dtype, offset = field.parts
        where = f"tensor '{field.name}'"
        try:
            qtype = gguf.GGMLQuantizationType(int(raw_dtype[0]))
        except ValueError:
            raise _Damaged(f"{where} has unknown ggml type {int(raw_dtype[0])}") from None
        ne = [int(x) for x in dims]
        shape = tuple(reversed(ne))  # torch order, as every other message gives shapes
        if any(n <= 0 for n in ne):
            raise _Damaged(f"{where} has invalid shape {shape}")
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if ne[0] % block:
            raise _Damaged(
                f"{where}: row length {ne[0]} is not a multiple of {qtype.name}'s block of {block}"
            )
        n_elems = 1
        for n in ne:
            n_elems *= n
        nbytes = n_elems // block * type_size
        start = start_offs + int(offset[0])
        if int(offset[0]) % self.alignment:
            raise _Damaged(
                f"{where} starts at data offset {int(offset[0])}, not a multiple of {self.alignment}"
            )
        if start + nbytes > len(self.data):
            raise _Damaged(
                f"{where} ({qtype.name}, shape {shape}) needs {nbytes} bytes at byte {start}, but the file "
                f"has {len(self.data)} bytes: truncated or damaged"
            )
        return start, start + nbytes, field.name


# Bytes read per call when a file's tensors are read into memory (GGUFFile.read_into_memory).
_READ_CHUNK = 64 << 20


class GGUFFile:
    """Metadata and tensors of one GGUF file. Tensor data stays memory-mapped unless
    `read_into_memory` copies it into RAM."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        p = Path(path)
        if not p.is_file():
            raise GGUFFormatError(f"{self.path}: no such file")
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(_HEADER_BYTES)
        if head[:4] != b"GGUF":
            raise GGUFFormatError(f"{self.path}: not a GGUF file (magic {head[:4]!r}, expected b'GGUF')")
        if size < _HEADER_BYTES:
            raise GGUFFormatError(f"{self.path}: truncated GGUF ({size} bytes; the header alone is 24)")
        try:
            self.reader = _CheckedReader(self.path, "r")
        except _Damaged as exc:
            raise GGUFFormatError(f"{self.path}: {exc}") from None
        except _PARSE_ERRORS as exc:
            raise GGUFFormatError(
                f"{self.path}: damaged or truncated GGUF ({type(exc).__name__}: {exc})"
            ) from None
        self.tensors: dict[str, gguf.ReaderTensor] = {t.name: t for t in self.reader.tensors}
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise GGUFFormatError(f"{self.path}: metadata has no 'general.architecture' string")
        self.arch: str = arch

    @cached_property
    def metadata(self) -> dict[str, Any]:
        """Every metadata value except the large tokenizer arrays (see `array`)."""
        out: dict[str, Any] = {}
        for key, field in self.reader.fields.items():
            if key in _LAZY_ARRAYS:
                continue
            out[key] = self._value(key, field)
        return out

    def array(self, key: str) -> list | None:
        """A metadata array read on demand (tokenizer vocabulary and friends); None if absent."""
        field = self.reader.fields.get(key)
        return None if field is None else self._value(key, field)

    def array_len(self, key: str) -> int | None:
        """The length of metadata array `key`, without decoding it; None if absent or not an array."""
        field = self.reader.fields.get(key)
        if field is None or field.types[:1] != [GGUFValueType.ARRAY]:
            return None
        return len(field.data)

    def _value(self, key: str, field: gguf.ReaderField) -> Any:
        try:
            return field.contents()
        except (*_PARSE_ERRORS, _Damaged) as exc:
            raise GGUFFormatError(f"{self.path}: metadata '{key}' is unreadable ({exc})") from None

    def qtype(self, name: str) -> gguf.GGMLQuantizationType:
        return gguf.GGMLQuantizationType(int(self.tensors[name].tensor_type))

    def shape(self, name: str) -> tuple[int, ...]:
        """Torch-order shape (ggml's ne reversed)."""
        return tuple(int(x) for x in reversed(self.tensors[name].shape))

    def nbytes(self) -> int:
        return sum(int(t.n_bytes) for t in self.tensors.values())

    def read_into_memory(self, progress: bool = True) -> int:
        """Read every tensor's bytes into one anonymous buffer and point `tensors` at it; returns the
        bytes read. Call it before anything holds a tensor's data.

        The same bytes, not a second copy: the file's mapping of the tensor region is then never
        touched, so resident memory is the buffer alone, as it is the touched pages of the mapping
        otherwise. What it buys: weights that the kernel cannot drop under memory pressure (a mapped
        file's pages can be, and are then read from disk again mid-generation), and transparent huge
        pages, which numpy asks for on a buffer this large and a mapped file does not get. What it
        costs: a slower load (the file is read up front). `graftlm bench --no-mmap` against the
        default measures the difference in speed (BENCHMARKS.md: none beyond noise in decode, on the
        machines measured). llama.cpp's `--no-mmap` is the same choice.
        """
        if not self.tensors:
            return 0
        from tqdm.auto import tqdm

        start = min(int(t.data_offset) for t in self.tensors.values())
        end = max(int(t.data_offset) + int(t.n_bytes) for t in self.tensors.values())
        buf = np.empty(end - start, dtype=np.uint8)
        view = memoryview(buf)
        done = 0
        with (
            open(self.path, "rb", buffering=0) as f,
            tqdm(
                total=len(buf),
                desc="reading weights",
                unit="B",
                unit_scale=True,
                disable=not progress,
                leave=False,
            ) as bar,
        ):
            f.seek(start)
            while done < len(buf):
                n = f.readinto(view[done : done + _READ_CHUNK])
                if not n:
                    raise GGUFFormatError(
                        f"{self.path}: the file ended at byte {start + done} while reading its tensors "
                        f"(they run to byte {end}); was it truncated while open?"
                    )
                done += n
                bar.update(n)
        for name, t in self.tensors.items():
            first = int(t.data_offset) - start
            data = buf[first : first + int(t.n_bytes)].view(t.data.dtype).reshape(t.data.shape)
            self.tensors[name] = t._replace(data=data)
        log.info("read %.0f MB of tensors from %s into memory", len(buf) / 1e6, self.path)
        return len(buf)
