"""Parsing of untrusted JSON and safetensors headers that never raises on hostile input.

Both the upload gate (``check_adapter_header``) and the engine's full validation read an adapter's
``adapter_config.json`` and the JSON header of its ``adapter_model.safetensors`` with the functions
here. Whatever the bytes are, they return a value or append a problem to a list; they raise
nothing else. What a fuzzer finds and what is done about it:

* Text: strict UTF-8 (a UTF-16 or Latin-1 file is refused, not guessed); a ``\\ud800`` escape
  that would put an unpaired surrogate into a string (which no UTF-8 response can carry) is refused.
* Numbers: ``NaN``/``Infinity`` literals and floats that overflow to infinity are refused, and so
  are integer literals past Python's digit limit (a ``ValueError`` inside ``json``).
* Nesting: ``[[[[...`` thousands deep makes ``json`` raise ``RecursionError``; a document that
  parses but is nested deeper than :data:`MAX_JSON_DEPTH` is refused too, so that no later step
  (a ``repr`` in a message) can recurse on it.
* safetensors framing: the 8-byte header length against the file size, the header an object of
  objects, ``dtype`` a known name, ``shape`` a short list of non-negative integers (not floats,
  strings or booleans) whose byte size is computed with Python integers (no overflow), and
  ``data_offsets`` exactly two such integers with ``0 <= begin <= end <= data length`` and
  ``end - begin`` the tensor's size; the ranges must tile the data exactly (no overlap, no gap, no
  trailing bytes), as the safetensors library itself requires. ``__metadata__`` maps strings to
  strings.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import BinaryIO

import torch

WEIGHTS_FILE = "adapter_model.safetensors"
MAX_JSON_DEPTH = 32  # a PEFT config is 3 levels deep, a safetensors header 3
MAX_SAFETENSORS_HEADER_BYTES = 100 << 20  # what the safetensors library itself accepts
MAX_TENSOR_DIMS = 8
_NAMES_SHOWN = 5

SAFETENSORS_DTYPES = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_ITEM_BYTES = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in SAFETENSORS_DTYPES.items()}


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _nesting_problem(document: object) -> str | None:
    """Walk ``document`` without recursion: too deep, or a string with an unpaired surrogate."""
    stack: list[tuple[object, int]] = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return "a string holds an unpaired surrogate (a \\ud800-style escape), which is not valid UTF-8"
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            return f"it is nested deeper than {MAX_JSON_DEPTH} levels"
        children = list(value.items()) if isinstance(value, dict) else [(None, v) for v in value]
        for key, child in children:
            if key is not None:
                stack.append((key, depth))
            stack.append((child, depth + 1))
    return None


def parse_json(data: bytes, what: str, problems: list[str], *, allow_bom: bool = False,
               finite: bool = True) -> object | None:
    """Parse untrusted JSON bytes; on any problem append ``"{what} is not valid JSON: ..."`` and
    return None. ``allow_bom`` accepts a leading UTF-8 byte order mark (editors add one);
    ``finite=False`` lets ``NaN``, ``Infinity`` and overflowing floats through as Python floats
    (for a document whose checks name the field that holds one)."""
    try:
        text = bytes(data).decode("utf-8-sig" if allow_bom else "utf-8")
    except UnicodeDecodeError as exc:
        problems.append(f"{what} is not valid JSON: it is not UTF-8 text ({exc.reason} at byte {exc.start})")
        return None
    try:
        numbers = {"parse_constant": _refuse_constant, "parse_float": _finite_float} if finite else {}
        document = json.loads(text, **numbers)
    except RecursionError:
        problems.append(f"{what} is not valid JSON: it is nested deeper than the parser allows")
        return None
    except ValueError as exc:  # JSONDecodeError, the integer digit limit, refused numbers
        problems.append(f"{what} is not valid JSON: {str(exc)[:200]}")
        return None
    problem = _nesting_problem(document)
    if problem is not None:
        problems.append(f"{what} is not valid JSON: {problem}")
        return None
    return document


def _is_count(value: object) -> bool:
    """A JSON integer >= 0 (booleans, floats and strings are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _names(items: list[str]) -> str:
    shown = ", ".join(repr(n) if not n.isprintable() else n for n in items[:_NAMES_SHOWN])
    return shown + (f" (and {len(items) - _NAMES_SHOWN} more)" if len(items) > _NAMES_SHOWN else "")


def _entry_problem(info: object, data_len: int) -> tuple[str | None, tuple[int, int] | None, torch.Tensor | None]:
    """(reason, byte range, meta tensor) of one header entry: a reason when it is unusable."""
    if not isinstance(info, dict):
        return "an entry that is not an object", None, None
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        return "an unknown dtype", None, None
    if not isinstance(shape, list) or len(shape) > MAX_TENSOR_DIMS or not all(_is_count(d) for d in shape):
        return f"a bad shape (not a list of at most {MAX_TENSOR_DIMS} non-negative integers)", None, None
    nbytes = math.prod(shape) * _ITEM_BYTES[dtype]
    if nbytes > data_len:
        return "more data than the file holds (the file is truncated, or the shape is wrong)", None, None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1] and offsets[1] - offsets[0] == nbytes):
        return ("a bad byte range (data_offsets must be two integers 0 <= begin <= end, "
                "end - begin the size of dtype and shape)"), None, None
    return None, (offsets[0], offsets[1]), torch.empty(shape, dtype=SAFETENSORS_DTYPES[dtype], device="meta")


def _metadata_problem(header: dict) -> str | None:
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        return "__metadata__ must map strings to strings"
    return None


def _layout_problem(ranges: dict[str, tuple[int, int]], data_len: int) -> str | None:
    """The byte ranges must tile ``[0, data_len)`` exactly, in some order."""
    past_end = sorted(name for name, (_, end) in ranges.items() if end > data_len)
    if past_end:
        return (f"it is truncated: {len(past_end)} tensor(s) extend past the end of its "
                f"{data_len} bytes of data: {_names(past_end)}")
    position = 0
    for name, (begin, end) in sorted(ranges.items(), key=lambda item: item[1]):
        if begin != position:
            return f"the tensors' byte ranges overlap or leave gaps (at tensor {_names([name])}, byte {begin})"
        position = end
    if position != data_len:
        return f"it is truncated or padded: the header describes {position} bytes of data, the file holds {data_len}"
    return None


def _read_framing(handle: BinaryIO, size: int, problems: list[str]) -> dict | None:
    """The header object of a safetensors stream of ``size`` bytes, or None (with a problem)."""
    bad = f"{WEIGHTS_FILE} is not a valid safetensors file"
    prefix = handle.read(8)
    if len(prefix) < 8:
        problems.append(f"{bad}: it is only {size} bytes")
        return None
    header_len = int.from_bytes(prefix, "little")
    if header_len > MAX_SAFETENSORS_HEADER_BYTES or 8 + header_len > size:
        problems.append(f"{bad}: header length {header_len} does not fit the {size}-byte file")
        return None
    header = parse_json(handle.read(header_len), f"{bad}: its header", problems)
    if header is None:
        return None
    if not isinstance(header, dict):
        problems.append(f"{bad}: its header is not a JSON object")
        return None
    return header


def read_safetensors_header(source: str | Path | bytes | bytearray | memoryview,
                            problems: list[str]) -> dict[str, torch.Tensor] | None:
    """The tensors a safetensors file (a path, or its bytes) declares, as ``meta`` tensors.

    No tensor data is read. Checks everything listed in the module docstring; problems are
    appended to ``problems`` (each starting ``adapter_model.safetensors is not a valid
    safetensors file``) and None is returned.
    """
    if isinstance(source, (str, Path)):
        with open(source, "rb") as handle:
            return _parse_header(handle, Path(source).stat().st_size, problems)
    view = memoryview(source)
    return _parse_header(io.BytesIO(view), view.nbytes, problems)


def _parse_header(handle: BinaryIO, size: int, problems: list[str]) -> dict[str, torch.Tensor] | None:
    bad = f"{WEIGHTS_FILE} is not a valid safetensors file"
    header = _read_framing(handle, size, problems)
    if header is None:
        return None
    data_len = size - handle.tell()
    metadata_problem = _metadata_problem(header)
    if metadata_problem is not None:
        problems.append(f"{bad}: {metadata_problem}")
        return None
    by_reason: dict[str, list[str]] = {}
    tensors: dict[str, torch.Tensor] = {}
    ranges: dict[str, tuple[int, int]] = {}
    for name, info in header.items():
        reason, byte_range, tensor = _entry_problem(info, data_len)
        if reason is not None:
            by_reason.setdefault(reason, []).append(name)
            continue
        ranges[name], tensors[name] = byte_range, tensor
    for reason, names in by_reason.items():
        problems.append(f"{bad}: {len(names)} tensor(s) with {reason}: {_names(sorted(names))}")
    if by_reason:
        return None
    layout_problem = _layout_problem(ranges, data_len)
    if layout_problem is not None:
        problems.append(f"{bad}: {layout_problem}")
        return None
    if not tensors:
        problems.append(f"{WEIGHTS_FILE} holds no tensors")
        return None
    return tensors
