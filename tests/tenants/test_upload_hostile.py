"""Hostile uploads: every archive or file that cannot be parsed is an ``UploadError`` (422, or 413
for a size limit) naming the problem, never another exception (which the api answers with 500),
and a corrupted archive is never accepted.

The hostile inputs are built here from a valid adapter: zip members with patched CRC, sizes,
flags and compression method; tar.gz files with a flipped bit, a wrong ISIZE, a cut trailer;
JSON nested far beyond the parser's depth; safetensors headers whose ``data_offsets``, shapes and
dtypes are wrong in every way a fuzzer finds. A seeded byte-flipping fuzzer runs over each
container format at the end (its seed is printed).
"""

from __future__ import annotations

import gzip
import io
import json
import random
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from benchmarks.synthetic_adapters import synthetic_adapter
from inference.adapters.peft_checkpoint import AdapterValidationError, check_adapter_header, validate_adapter_files
from inference.model_config import ModelConfig
from support.hostile_archives import (
    CONFIG,
    WEIGHTS,
    central_entry,
    flipped_weight_bit,
    patch_zip,
    safetensors_with_header,
    tar_of,
    zip_member_data,
    zip_of,
)
from tenants.adapter_uploads import UploadError, UploadLimits, stage_upload

LIMITS = UploadLimits(max_bytes=1 << 20, max_members=8, max_rank=64)
SEED = 20240611


@pytest.fixture(scope="module")
def model_config() -> ModelConfig:
    return ModelConfig.from_dict(dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, model_config) -> tuple[bytes, bytes]:
    """(config bytes, weights bytes) of a valid rank-4 q/v adapter."""
    print(f"adapter seed {SEED}")
    out = synthetic_adapter(tmp_path_factory.mktemp("adapter"), model_config, r=4, targets=("q_proj", "v_proj"),
                            alpha=8, seed=SEED)
    return (out / CONFIG).read_bytes(), (out / WEIGHTS).read_bytes()


def _stage(tmp_path: Path, model_config, parts: list[tuple[str, bytes]]):
    """Run ``stage_upload`` on ``parts`` ((client file name, bytes)) in a fresh work folder."""
    work = tmp_path / f"work-{len(list(tmp_path.iterdir()))}"
    (work / "staged").mkdir(parents=True)
    received = []
    for i, (name, data) in enumerate(parts):
        path = work / f"part-{i}"
        path.write_bytes(data)
        received.append((name, path))
    return stage_upload(received, work / "staged", model_config, LIMITS)


def refused(tmp_path, model_config, parts, *fragments: str, status: int = 422) -> UploadError:
    """Assert the upload is refused with ``status`` and that the problems mention each fragment."""
    with pytest.raises(UploadError) as info:
        _stage(tmp_path, model_config, parts)
    text = " | ".join(info.value.problems).lower()
    assert info.value.status == status, info.value.problems
    assert info.value.problems and all(isinstance(p, str) for p in info.value.problems)
    for fragment in fragments:
        assert fragment.lower() in text, f"{fragment!r} not in {info.value.problems}"
    return info.value


def two_files(config: bytes, weights: bytes) -> list[tuple[str, bytes]]:
    return [(CONFIG, config), (WEIGHTS, weights)]


# --- zip ------------------------------------------------------------------------------------------

def _zip_cases(config: bytes, weights: bytes) -> dict[str, tuple[bytes, str]]:
    members = {CONFIG: config, WEIGHTS: weights}
    deflated, stored = zip_of(members), zip_of(members, zipfile.ZIP_STORED)
    flip = bytearray(deflated)
    at = zip_member_data(deflated, WEIGHTS) + 40
    flip[at:at + 8] = b"\xff" * 8
    renamed = bytearray(deflated)
    local = struct.unpack_from("<I", deflated, central_entry(deflated, WEIGHTS) + 42)[0]
    renamed[local + 30] ^= 0x20  # the local header's name no longer matches the directory's
    return {
        "crc": (patch_zip(deflated, WEIGHTS, crc=lambda c: c ^ 1), "crc"),
        "crc stored": (patch_zip(stored, WEIGHTS, crc=lambda c: c ^ 0x80000000), "crc"),
        "size smaller": (patch_zip(deflated, WEIGHTS, usize=lambda s: s - 1), "corrupt"),
        "size larger": (patch_zip(deflated, WEIGHTS, usize=lambda s: s + 1), "size"),
        "stored sizes larger": (patch_zip(stored, CONFIG, usize=lambda s: s + 7, csize=lambda s: s + 7), "corrupt"),
        "compressed size smaller": (patch_zip(deflated, WEIGHTS, csize=lambda s: s // 2), "corrupt"),
        "encrypted": (patch_zip(deflated, WEIGHTS, flags=lambda f: f | 0x1), "encrypted"),
        "method 99": (patch_zip(deflated, WEIGHTS, method=99), "compression method"),
        "method 77": (patch_zip(deflated, WEIGHTS, method=77), "compression method"),
        "bad deflate data": (bytes(flip), "corrupt"),
        "local name differs": (bytes(renamed), "corrupt"),
        "truncated": (deflated[: len(deflated) // 2], "not a valid zip"),
    }


@pytest.mark.parametrize("case", ["crc", "crc stored", "size smaller", "size larger", "stored sizes larger",
                                  "compressed size smaller", "encrypted", "method 99", "method 77",
                                  "bad deflate data", "local name differs", "truncated"])
def test_malformed_zip_is_422(tmp_path, model_config, adapter, case):
    blob, fragment = _zip_cases(*adapter)[case]
    refused(tmp_path, model_config, [("adapter.zip", blob)], fragment)


def test_corrupt_ignored_member_is_also_refused(tmp_path, model_config, adapter):
    """Every member is read to its end and checked, the ones that are skipped (a README) too."""
    blob = zip_of({"README.md": b"# card\n" * 50, CONFIG: adapter[0], WEIGHTS: adapter[1]})
    refused(tmp_path, model_config, [("adapter.zip", patch_zip(blob, "README.md", crc=lambda c: c ^ 1))], "crc")


def test_valid_zip_and_tar_gz_are_accepted(tmp_path, model_config, adapter):
    members = {CONFIG: adapter[0], WEIGHTS: adapter[1], "README.md": b"# card"}
    for name, blob in (("a.zip", zip_of(members)), ("a.zip", zip_of(members, zipfile.ZIP_STORED)),
                       ("a.tar.gz", tar_of(members, "gz")), ("a.tgz", tar_of(members, "gz", level=0)),
                       ("a.tar", tar_of(members, "")), ("a.tar.gz", tar_of(members, "xz"))):
        staged = _stage(tmp_path, model_config, [(name, blob)])
        assert staged.rank == 4 and staged.weights_path.read_bytes() == adapter[1], name


# --- tar ------------------------------------------------------------------------------------------


def _tar_cases(config: bytes, weights: bytes) -> dict[str, tuple[str, bytes, str]]:
    members = {CONFIG: config, WEIGHTS: weights}
    good_gz = tar_of(members, "gz")
    wrong_isize = bytearray(good_gz)
    struct.pack_into("<I", wrong_isize, len(good_gz) - 4, struct.unpack_from("<I", good_gz, len(good_gz) - 4)[0] + 1)
    plain = tar_of(members, "")
    cut_in_weights = plain[: plain.find(weights[:64]) + len(weights) // 2]
    xz = bytearray(tar_of(members, "xz"))
    xz[len(xz) // 2] ^= 0x01
    return {
        "flipped bit": ("adapter.tar.gz", flipped_weight_bit(config, weights), "crc"),
        "wrong isize": ("adapter.tar.gz", bytes(wrong_isize), "length"),
        "trailer cut": ("adapter.tar.gz", good_gz[:-6], "end"),
        "garbage after the stream": ("adapter.tgz", good_gz + b"garbage!", "corrupt"),
        "member cut short": ("adapter.tar", cut_in_weights, "end of data"),
        "member cut short, gzipped": ("adapter.tar.gz", gzip.compress(cut_in_weights), "end of data"),
        "xz flipped bit": ("adapter.tar.gz", bytes(xz), "corrupt"),
        "not a tar": ("adapter.tar.gz", gzip.compress(b"x" * 1000), "not a valid tar"),
        "not compressed at all": ("adapter.tgz", b"\x1f\x8b" + b"\0" * 100, "corrupt"),
    }


@pytest.mark.parametrize("case", ["flipped bit", "wrong isize", "trailer cut", "garbage after the stream",
                                  "member cut short", "member cut short, gzipped", "xz flipped bit", "not a tar",
                                  "not compressed at all"])
def test_malformed_tar_is_422(tmp_path, model_config, adapter, case):
    name, blob, fragment = _tar_cases(*adapter)[case]
    refused(tmp_path, model_config, [(name, blob)], fragment)


def test_gzip_bomb_is_413_before_it_is_read_out(tmp_path, model_config):
    """A small .tar.gz that decompresses far past the limit stops at the limit (413)."""
    blob = gzip.compress(b"\0" * (8 * LIMITS.max_bytes), compresslevel=9)
    assert len(blob) < LIMITS.max_bytes // 50
    refused(tmp_path, model_config, [("bomb.tar.gz", blob)], "limit", status=413)


# --- JSON and safetensors headers ---------------------------------------------------------------


def _tensor(offsets, shape=(4, 64), dtype="F32") -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


N = 4 * 64 * 4  # bytes of one [4, 64] float32 tensor

HEADER_CASES = {
    "deep list": ("[" * 100_000 + "]" * 100_000, "nested"),
    "deep object": ('{"a":' * 50_000 + "1" + "}" * 50_000, "nested"),
    "deep but parseable": ('{"x": ' + "[" * 200 + "]" * 200 + "}", "nested"),
    "huge int offsets": ({"t": _tensor([0, 2**70])}, "byte range"),
    "huge int literal": ('{"t": {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 1' + "0" * 5000 + "]}}",
                         "not valid json"),
    "infinite offset": ('{"t": {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, Infinity]}}', "json"),
    "float offsets": ({"t": _tensor([0.0, float(N)])}, "byte range"),
    "string offsets": ({"t": _tensor(["0", str(N)])}, "byte range"),
    "bool offsets": ({"t": _tensor([False, N])}, "byte range"),
    "negative offsets": ({"t": _tensor([-N, 0])}, "byte range"),
    "end before start": ({"t": _tensor([N, 0])}, "byte range"),
    "beyond the file": ({"t": _tensor([N, 2 * N])}, "past the end"),
    "three offsets": ({"t": _tensor([0, N, 2 * N])}, "byte range"),
    "offsets object": ({"t": {"dtype": "F32", "shape": [4, 64], "data_offsets": {"0": 1, str(N): 2}}}, "byte range"),
    "overlapping": ({"t": _tensor([0, N]), "u": _tensor([0, N])}, "overlap"),
    "gap": ({"t": _tensor([0, N // 4], shape=(1, 64)), "u": _tensor([N // 2, 3 * N // 4], shape=(1, 64))}, "gaps"),
    "padded": ({"t": _tensor([0, N // 4], shape=(1, 64))}, "padded"),
    "huge shape": ({"t": _tensor([0, N], shape=(2**70,))}, "shape"),
    "overflowing shape": ({"t": _tensor([0, N], shape=(2**40, 2**40))}, "shape"),
    "infinite shape": ('{"t": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 1024]}}', "json"),
    "negative shape": ({"t": _tensor([0, N], shape=(-4, -64))}, "shape"),
    "string shape": ({"t": _tensor([0, N], shape=("4", "64"))}, "shape"),
    "bool shape": ({"t": _tensor([0, N], shape=(True, 1024))}, "shape"),
    "shape not a list": ({"t": {"dtype": "F32", "shape": 1024, "data_offsets": [0, N]}}, "shape"),
    "unknown dtype": ({"t": _tensor([0, N], dtype="Q7")}, "dtype"),
    "unhashable dtype": ({"t": {"dtype": ["F32"], "shape": [4, 64], "data_offsets": [0, N]}}, "dtype"),
    "entry is a list": ({"t": [1, 2, 3]}, "not an object"),
    "entry is null": ({"t": None}, "not an object"),
    "header is a list": ([1, 2], "not a json object"),
    "metadata not strings": ({"__metadata__": {"a": [1]}, "t": _tensor([0, N])}, "__metadata__"),
    "not utf-8": (b'{"t\xff": 1}', "utf-8"),
    "lone surrogate": ('{"\\ud800": {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 1024]}}', "utf-8"),
}


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_malformed_safetensors_header_is_422(tmp_path, model_config, adapter, case):
    header, fragment = HEADER_CASES[case]
    weights = safetensors_with_header(header, b"\0" * N)
    error = refused(tmp_path, model_config, two_files(adapter[0], weights), fragment)
    for problem in error.problems:
        problem.encode("utf-8")  # the api must be able to send it
    # the engine's full validation (the validation job, the loader) refuses it too, never raises otherwise
    with pytest.raises(AdapterValidationError):
        validate_adapter_files(adapter[0], weights, model_config)


def _deep_config(config: bytes, depth: int) -> bytes:
    raw = json.loads(config)
    return json.dumps(raw)[:-1].encode() + b', "x": ' + b"[" * depth + b"]" * depth + b"}"


CONFIG_CASES = {
    "deep list": (lambda c: b"[" * 100_000 + b"]" * 100_000, "nested"),
    "deep inside": (lambda c: _deep_config(c, 100_000), "nested"),
    "deep but parseable": (lambda c: _deep_config(c, 300), "nested"),
    "huge int": (lambda c: c.replace(b'"r": 4', b'"r": 1' + b"0" * 5000), "not valid json"),
    "utf-16": (lambda c: c.decode().encode("utf-16"), "json"),
    "regex nested groups": (lambda c: _with(c, target_modules="(" * 5000 + "q_proj" + ")" * 5000), "regex"),
    "exclude nested groups": (lambda c: _with(c, exclude_modules="(" * 5000 + "x" + ")" * 5000), "regex"),
    "target_modules object": (lambda c: _with(c, target_modules={"q_proj": 1}), "target_modules"),
    "target_modules nested lists": (lambda c: _with(c, target_modules=[["q_proj"]]), "target_modules"),
    "lone surrogate": (lambda c: c.replace(b'"LORA"', b'"\\udc00"'), "surrogate"),
}


def _with(config: bytes, **changes) -> bytes:
    raw = json.loads(config)
    raw.update(changes)
    return json.dumps(raw).encode()


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_malformed_config_is_422(tmp_path, model_config, adapter, case):
    make, fragment = CONFIG_CASES[case]
    config = make(adapter[0])
    error = refused(tmp_path, model_config, two_files(config, adapter[1]), fragment)
    for problem in error.problems:
        problem.encode("utf-8")
    with pytest.raises(AdapterValidationError):
        validate_adapter_files(config, adapter[1], model_config)


def test_header_check_and_full_validation_agree_on_a_good_adapter(tmp_path, model_config, adapter):
    path = tmp_path / WEIGHTS
    path.write_bytes(adapter[1])
    summary = check_adapter_header(adapter[0], path, model_config)
    assert (summary.rank, summary.target_modules) == (4, ("q_proj", "v_proj"))
    assert validate_adapter_files(adapter[0], adapter[1], model_config).rank == 4


def test_problems_are_bounded_and_sendable(tmp_path, model_config, adapter):
    """Problems go back to the client as they are: a megabyte-long config value, thousands of
    unexpected archive members and member names that are not UTF-8 (tarfile hands them over with
    lone surrogates) still give a short list of UTF-8-encodable problems."""
    error = refused(tmp_path, model_config, two_files(_with(adapter[0], modules_to_save=["m" * 500_000]), adapter[1]),
                    "modules_to_save")
    assert sum(len(p) for p in error.problems) < 5_000
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", encoding="utf-8", errors="surrogateescape") as tf:
        for name in ["bad\udcff.bin"] + [f"x{i}.json" for i in range(7)]:
            info = tarfile.TarInfo(name)
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
    error = refused(tmp_path, model_config, [("a.tar", raw.getvalue())], "pickle")
    for problem in error.problems:
        problem.encode("utf-8")
    many = UploadError([f"problem {i}" for i in range(1000)])
    assert len(many.problems) <= 51 and "more problems" in many.problems[-1]


# --- fuzzing ----------------------------------------------------------------------------------------


def _mutations(blob: bytes, rng: random.Random, count: int):
    for _ in range(count):
        data = bytearray(blob)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            data[at] = rng.choice((0, 0xFF, data[at] ^ (1 << rng.randrange(8)), rng.randrange(256)))
        if rng.random() < 0.1:
            data = data[: rng.randrange(len(data))]
        yield bytes(data)


@pytest.mark.parametrize("kind", ["zip", "tar.gz", "safetensors", "config"])
def test_fuzzed_uploads_never_raise_anything_else(tmp_path, model_config, adapter, kind):
    """Random byte mutations of a valid upload: each one is staged or refused with UploadError,
    and an archive is accepted only when what it yields is exactly the original adapter (a
    mutation of a timestamp or a comment is harmless; one of the data must be caught)."""
    seed = random.randrange(1 << 30)
    print(f"fuzz seed for {kind}: {seed}")
    rng = random.Random(seed)
    config, weights = adapter
    members = {CONFIG: config, WEIGHTS: weights}
    base = {"zip": zip_of(members), "tar.gz": tar_of(members), "safetensors": weights, "config": config}[kind]
    accepted = 0
    for mutated in _mutations(base, rng, 60):
        if kind == "zip":
            parts = [("a.zip", mutated)]
        elif kind == "tar.gz":
            parts = [("a.tar.gz", mutated)]
        elif kind == "safetensors":
            parts = two_files(config, mutated)
        else:
            parts = two_files(mutated, weights)
        try:
            staged = _stage(tmp_path, model_config, parts)
        except UploadError as exc:
            assert exc.status in (413, 422) and exc.problems
            continue
        accepted += 1
        if kind in ("zip", "tar.gz"):
            assert staged.weights_path.read_bytes() == weights and staged.config_path.read_bytes() == config
    print(f"{accepted} of 60 mutations accepted")
