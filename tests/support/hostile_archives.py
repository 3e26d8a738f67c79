"""Hostile adapter uploads for tests: archives with patched headers, corrupted compressed
streams and safetensors files with arbitrary headers, built from valid adapter bytes."""

from __future__ import annotations

import gzip
import json
import struct
import zipfile

from support.platform_flows import tar_bytes, zip_bytes

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


# (central directory offset, local header offset, struct format) of the fields a test patches
_ZIP_FIELDS = {"flags": (8, 6, "<H"), "method": (10, 8, "<H"), "crc": (16, 14, "<I"), "csize": (20, 18, "<I"),
               "usize": (24, 22, "<I")}


def zip_of(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    return zip_bytes(members, compression)


def central_entry(blob: bytes, name: str) -> int:
    """The offset of member ``name``'s entry in the zip's central directory."""
    start = 0
    while True:
        at = blob.index(b"PK\x01\x02", start)
        name_len = struct.unpack_from("<H", blob, at + 28)[0]
        if blob[at + 46:at + 46 + name_len] == name.encode():
            return at
        start = at + 4


def patch_zip(blob: bytes, name: str, **changes) -> bytes:
    """Rewrite header fields of member ``name`` in both its local header and its central entry;
    each change is a value or a function of the old value."""
    data = bytearray(blob)
    central = central_entry(blob, name)
    local = struct.unpack_from("<I", blob, central + 42)[0]
    for field, change in changes.items():
        central_at, local_at, fmt = _ZIP_FIELDS[field]
        for at in (central + central_at, local + local_at):
            old = struct.unpack_from(fmt, data, at)[0]
            struct.pack_into(fmt, data, at, change(old) if callable(change) else change)
    return bytes(data)


def zip_member_data(blob: bytes, name: str) -> int:
    """The offset of member ``name``'s (compressed) data."""
    local = struct.unpack_from("<I", blob, central_entry(blob, name) + 42)[0]
    name_len, extra_len = struct.unpack_from("<HH", blob, local + 26)
    return local + 30 + name_len + extra_len


def tar_of(members: dict[str, bytes], compression: str = "gz", level: int = 9) -> bytes:
    """A tar of ``members``, compressed by ``compression`` ('' none, 'gz' at ``level``, 'xz', 'bz2')."""
    raw = tar_bytes(members)
    if compression == "gz":
        return gzip.compress(raw, compresslevel=level, mtime=0)
    if compression == "xz":
        import lzma

        return lzma.compress(raw)
    if compression == "bz2":
        import bz2

        return bz2.compress(raw)
    return raw


def flipped_weight_bit(config: bytes, weights: bytes) -> bytes:
    """A .tar.gz (stored deflate blocks) whose body has one bit of a weight flipped: it still
    decompresses, the tar and the safetensors still parse, every value is still finite; only the
    gzip CRC-32 tells."""
    gz = bytearray(tar_of({CONFIG: config, WEIGHTS: weights}, "gz", level=0))
    probe = weights[-64:-48]  # the last tensor's data, verbatim inside a stored block
    at = gz.find(probe)
    assert at > 0
    gz[at] ^= 0x01  # the lowest mantissa bit of a little-endian float32
    return bytes(gz)


def safetensors_with_header(header: object | str | bytes, data: bytes) -> bytes:
    """A safetensors file: 8-byte length, ``header`` (raw bytes, JSON text or an object), ``data``."""
    if isinstance(header, bytes):
        raw = header
    else:
        raw = (header if isinstance(header, str) else json.dumps(header)).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + data
