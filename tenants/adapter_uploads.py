"""Turn an uploaded adapter (two PEFT files, or one .zip / .tar.gz of them) into two checked files
on local disk, ready to be streamed to the object store.

Nothing here trusts the upload: file names are reduced to base names, archive members are checked
before anything is extracted (no absolute paths, no ``..``, no links or devices, no encrypted zip
members or unknown compression methods, a member count limit and byte limits that hold even if
the archive lies about sizes), pickle files are refused without being opened, and the adapter's
config and safetensors header are checked against the base model (``check_adapter_header``).

Archives are read to their end and every checksum is verified: each zip member is read whole
(zipfile checks its CRC-32 then) and must hold the size its header declares; a compressed tar is
first decompressed whole (gzip checks its CRC-32 and length, xz and bzip2 their own checks), so a
flipped bit anywhere is caught even where the tar reader would never look. Whatever error a
corrupt archive makes the standard library raise becomes a 422 naming it; only faults of this
server (a full disk) pass through. Every problem found is reported in one ``UploadError``.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import hashlib
import logging
import lzma
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from inference.adapters.peft_checkpoint import (
    CONFIG_FILE,
    PICKLE_SUFFIXES,
    WEIGHTS_FILE,
    AdapterValidationError,
    check_adapter_header,
)
from inference.model_config import ModelConfig

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
IGNORED_SUFFIXES = (".md", ".txt")  # model cards and notes that PEFT directories often carry
IGNORED_NAMES = (".gitattributes",)
MAX_CONFIG_BYTES = 1 << 20
MAX_PROBLEMS = 50  # problems sent back at most (the rest are counted)
MAX_PROBLEM_CHARS = 2000
ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2",
               zipfile.ZIP_LZMA: "lzma"}
TAR_OVERHEAD_BYTES = 1 << 20  # tar headers, padding and the end-of-archive records beside the files
_CHUNK = 1 << 20
# What the standard library raises on a corrupt or hostile archive (zipfile: BadZipFile, zlib.error,
# NotImplementedError for unknown methods, RuntimeError for encryption, EOFError, struct.error;
# tarfile: TarError; gzip: BadGzipFile (an OSError), EOFError; lzma: LZMAError; bz2: OSError).
_ARCHIVE_ERRORS = (zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError, struct.error, EOFError,
                   NotImplementedError, RuntimeError, ValueError, LookupError, TypeError, OverflowError, OSError)
# OSErrors that are this server's faults (its disk, its limits), never the upload's.
_SERVER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EROFS,
                  errno.EACCES}


def _sendable(problem: str) -> str:
    """``problem`` made safe for a JSON response: valid UTF-8 (lone surrogates from hostile
    names replaced) and at most MAX_PROBLEM_CHARS characters."""
    text = str(problem).encode("utf-8", "replace").decode("utf-8")
    if len(text) > MAX_PROBLEM_CHARS:
        text = text[:MAX_PROBLEM_CHARS] + f"... ({len(text) - MAX_PROBLEM_CHARS} more characters)"
    return text


class UploadError(ValueError):
    """The upload is not an acceptable adapter; ``problems`` lists every reason (bounded in
    number and length, always encodable as UTF-8: they go back to the client as they are)."""

    def __init__(self, problems: list[str], status: int = 422):
        shown = [_sendable(p) for p in problems[:MAX_PROBLEMS]] or ["the upload was refused"]
        if len(problems) > MAX_PROBLEMS:
            shown.append(f"... and {len(problems) - MAX_PROBLEMS} more problems")
        self.problems = shown
        self.status = status
        super().__init__("; ".join(shown))


@contextmanager
def _corrupt_archive(what: str) -> Iterator[None]:
    """Turn any error the standard library raises while reading a corrupt or hostile archive into
    an UploadError (422) that names ``what`` and the reason; this server's own faults (a full
    disk) pass through."""
    try:
        yield
    except UploadError:
        raise
    except _ARCHIVE_ERRORS as exc:
        if isinstance(exc, OSError) and exc.errno in _SERVER_ERRNOS:
            raise
        log.info("upload refused: %s is corrupt: %r", what, exc)
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise UploadError([f"{what} is corrupt or unsupported: {reason}"]) from exc


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int  # all files together, after extraction
    max_members: int  # files in an archive
    max_rank: int


@dataclass(frozen=True)
class StagedAdapter:
    """Checked files on local disk. ``sha256`` and ``weights_bytes`` are of the safetensors file."""

    config_path: Path
    weights_path: Path
    sha256: str
    size_bytes: int
    rank: int
    target_modules: tuple[str, ...]


def _copy_capped(source: BinaryIO, target: Path | None, budget: int, too_big: str | None = None) -> int:
    """Copy ``source`` to its end into ``target`` (None: read and discard), at most ``budget``
    bytes; raise UploadError(413) with ``too_big`` (or a default message) if the source has more."""
    written = 0
    with open(target, "wb") if target is not None else _Discard() as out:
        while True:
            chunk = source.read(_CHUNK)
            if not chunk:
                return written
            written += len(chunk)
            if written > budget:
                raise UploadError([too_big or f"the adapter files exceed the upload limit of {budget} bytes"],
                                  status=413)
            out.write(chunk)


class _Discard:
    """A write-only sink that keeps nothing (members that are read only to verify them)."""

    def __enter__(self) -> _Discard:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None

    def write(self, data: bytes) -> int:
        return len(data)


def _member_name(name: str, problems: list[str]) -> str | None:
    """The base name of a safe archive member path, or None (with a problem) for an unsafe one."""
    path = PurePosixPath(name.replace("\\", "/"))
    drive_like = bool(path.parts) and ":" in path.parts[0]  # C:/... from a Windows archiver
    if path.is_absolute() or ".." in path.parts or drive_like or not path.name:
        problems.append(f"archive member {name!r} points outside the archive")
        return None
    return path.name


def _zip_problems(member: zipfile.ZipInfo) -> list[str]:
    """What makes a zip member unreadable before any byte of it is read."""
    problems = []
    if stat.S_ISLNK(member.external_attr >> 16):
        problems.append(f"archive member {member.filename!r} is a symbolic link")
    if member.flag_bits & 0x1:
        problems.append(f"archive member {member.filename!r} is encrypted; encrypted archives are not accepted")
    if member.compress_type not in ZIP_METHODS:
        problems.append(f"archive member {member.filename!r} uses compression method {member.compress_type}, "
                        f"which is not supported (only {', '.join(ZIP_METHODS.values())})")
    return problems


def _read_zip_member(zf: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path | None, budget: int) -> int:
    """Read one member to its end (so that zipfile checks its CRC-32), into ``target`` or nowhere;
    its size must be the one its header declares. Returns the bytes read."""
    with _corrupt_archive(f"archive member {member.filename!r}"), zf.open(member) as source:
        written = _copy_capped(source, target, budget)
    if written != member.file_size:
        raise UploadError([f"archive member {member.filename!r} is corrupt: it declares a size of "
                           f"{member.file_size} bytes but holds {written}"])
    return written


def _extract_zip(archive: Path, into: Path, limits: UploadLimits, problems: list[str]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    with _corrupt_archive("the archive"):
        try:
            zf = zipfile.ZipFile(archive)
        except zipfile.BadZipFile as exc:
            raise UploadError([f"the archive is not a valid zip file: {exc}"]) from exc
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if len(members) > limits.max_members:
            raise UploadError([f"the archive has {len(members)} files; at most {limits.max_members} are accepted"])
        planned: list[tuple[zipfile.ZipInfo, str]] = []
        for member in members:
            name = _member_name(member.filename, problems)
            member_problems = _zip_problems(member)
            problems.extend(member_problems)
            if name is not None and not member_problems:
                planned.append((member, name))
        if sum(m.file_size for m, _ in planned) > limits.max_bytes:
            raise UploadError([f"the archive expands beyond the upload limit of {limits.max_bytes} bytes"], status=413)
        if problems:
            return files
        budget = limits.max_bytes
        for member, name in planned:  # every member is read whole, the ignored ones too
            target = into / name if _wanted(name, files, problems) else None
            budget -= _read_zip_member(zf, member, target, budget)
            if target is not None:
                files[name] = target
    return files


def _decompressor(archive: Path) -> Callable[[Path], BinaryIO] | None:
    """The opener of the compression the archive's first bytes announce (None: a plain tar)."""
    with open(archive, "rb") as handle:
        magic = handle.read(6)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open
    if magic[:3] == b"BZh":
        return bz2.open
    if magic == b"\xfd7zXZ\x00":
        return lzma.open
    return None


def _decompress_whole(archive: Path, into: Path, limits: UploadLimits) -> Path:
    """Decompress a compressed tar to its end into a plain file, which makes the decompressor verify
    its checksums (gzip: CRC-32 and length of every member; xz, bzip2: theirs) and catches trailing
    garbage. Stops with 413 at the upload limit (plus room for tar headers): a bomb is never read out."""
    opener = _decompressor(archive)
    if opener is None:
        return archive
    plain = into / ".archive.tar"
    budget = limits.max_bytes + TAR_OVERHEAD_BYTES + 1024 * limits.max_members
    with _corrupt_archive("the archive"), opener(archive) as source:
        _copy_capped(source, plain, budget, "the archive expands beyond the upload limit of "
                     f"{limits.max_bytes} bytes")
    return plain


def _extract_tar(archive: Path, into: Path, limits: UploadLimits, problems: list[str]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    plain = _decompress_whole(archive, into, limits)
    try:
        tf = tarfile.open(plain, mode="r:")
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        if isinstance(exc, OSError) and exc.errno in _SERVER_ERRNOS:
            raise
        raise UploadError([f"the archive is not a valid tar file: {exc}"]) from exc
    with tf:
        try:
            members = tf.getmembers()
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            raise UploadError([f"the archive is not a valid tar file: {exc}"]) from exc
        regular = [m for m in members if not m.isdir()]
        if len(regular) > limits.max_members:
            raise UploadError([f"the archive has {len(regular)} files; at most {limits.max_members} are accepted"])
        planned = []
        for member in regular:
            name = _member_name(member.name, problems)
            if not member.isfile():
                problems.append(f"archive member {member.name!r} is a link or device, not a regular file")
                continue
            if name is not None:
                planned.append((member, name))
        if sum(m.size for m, _ in planned) > limits.max_bytes:
            raise UploadError([f"the archive expands beyond the upload limit of {limits.max_bytes} bytes"], status=413)
        if problems:
            return files
        budget = limits.max_bytes
        for member, name in planned:
            if not _wanted(name, files, problems):
                continue
            with _corrupt_archive(f"archive member {member.name!r}"):
                source = tf.extractfile(member)
                if source is None:
                    continue
                with source:
                    target = into / name
                    budget -= _copy_capped(source, target, budget)
            files[name] = target
    if plain != archive:
        plain.unlink()
    return files


def _wanted(name: str, files: dict[str, Path], problems: list[str]) -> bool:
    """Whether to keep a file called ``name``; pickles, duplicates and strangers become problems."""
    lowered = name.lower()
    if lowered.endswith(PICKLE_SUFFIXES):
        problems.append(
            f"{name}: pickle files are not accepted (loading them can run arbitrary code); upload {WEIGHTS_FILE}"
        )
        return False
    if lowered.endswith(IGNORED_SUFFIXES) or name in IGNORED_NAMES:
        return False
    if name not in (CONFIG_FILE, WEIGHTS_FILE):
        problems.append(f"unexpected file {name!r}: an adapter is {CONFIG_FILE} plus {WEIGHTS_FILE}")
        return False
    if name in files:
        problems.append(f"{name} appears more than once")
        return False
    return True


def is_archive(filename: str) -> bool:
    return filename.lower().endswith(ARCHIVE_SUFFIXES)


def stage_upload(
    uploads: list[tuple[str, Path]], workdir: Path, model: ModelConfig, limits: UploadLimits
) -> StagedAdapter:
    """Check uploaded files (``(client file name, path of the received bytes)``) and return the
    two adapter files under ``workdir``. Raises UploadError listing every problem (status 422,
    or 413 when a size limit is exceeded)."""
    problems: list[str] = []
    if not uploads:
        raise UploadError(["no files: upload adapter_config.json and adapter_model.safetensors, or one archive"])
    files: dict[str, Path] = {}
    if len(uploads) == 1 and is_archive(uploads[0][0]):
        name, path = uploads[0]
        extract = _extract_zip if name.lower().endswith(".zip") else _extract_tar
        files = extract(path, workdir, limits, problems)
    else:
        total = sum(path.stat().st_size for _, path in uploads)
        if total > limits.max_bytes:
            raise UploadError([f"the adapter files exceed the upload limit of {limits.max_bytes} bytes"], status=413)
        for raw_name, path in uploads:
            name = PurePosixPath((raw_name or "").replace("\\", "/")).name
            if is_archive(name):
                problems.append(f"{name}: an archive must be the only file uploaded")
            elif not name:
                problems.append("a file part has no file name")
            elif _wanted(name, files, problems):
                target = workdir / name
                shutil.move(str(path), target)
                files[name] = target
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if required not in files and not any(required in p for p in problems):
            problems.append(f"{required} is missing")
    if problems:
        raise UploadError(problems)
    config_path, weights_path = files[CONFIG_FILE], files[WEIGHTS_FILE]
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise UploadError([f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes"])
    try:
        summary = check_adapter_header(config_path.read_bytes(), weights_path, model, limits.max_rank)
    except AdapterValidationError as exc:
        raise UploadError(list(exc.problems)) from exc
    return StagedAdapter(
        config_path=config_path,
        weights_path=weights_path,
        sha256=_sha256(weights_path),
        size_bytes=config_path.stat().st_size + weights_path.stat().st_size,
        rank=summary.rank,
        target_modules=summary.target_modules,
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
