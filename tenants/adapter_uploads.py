"""Turn an uploaded adapter (two PEFT files, or one .zip / .tar.gz of them) into two checked files
on local disk, ready to be streamed to the object store.

Nothing here trusts the upload: file names are reduced to base names, archive members are checked
before anything is extracted (no absolute paths, no ``..``, no links or devices, a member count
limit and byte limits that hold even if the archive lies about sizes), pickle files are refused
without being opened, and the adapter's config and safetensors header are checked against the base
model (``check_adapter_header``). Every problem found is reported in one ``UploadError``.
"""

from __future__ import annotations

import hashlib
import shutil
import stat
import tarfile
import zipfile
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

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
IGNORED_SUFFIXES = (".md", ".txt")  # model cards and notes that PEFT directories often carry
IGNORED_NAMES = (".gitattributes",)
MAX_CONFIG_BYTES = 1 << 20
_CHUNK = 1 << 20


class UploadError(ValueError):
    """The upload is not an acceptable adapter; ``problems`` lists every reason."""

    def __init__(self, problems: list[str], status: int = 422):
        self.problems = problems
        self.status = status
        super().__init__("; ".join(problems))


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


def _copy_capped(source: BinaryIO, target: Path, budget: int) -> int:
    """Copy at most ``budget`` bytes; raise UploadError(413) if the source has more."""
    written = 0
    with open(target, "wb") as out:
        while True:
            chunk = source.read(_CHUNK)
            if not chunk:
                return written
            written += len(chunk)
            if written > budget:
                raise UploadError([f"the adapter files exceed the upload limit of {budget} bytes"], status=413)
            out.write(chunk)


def _member_name(name: str, problems: list[str]) -> str | None:
    """The base name of a safe archive member path, or None (with a problem) for an unsafe one."""
    path = PurePosixPath(name.replace("\\", "/"))
    drive_like = bool(path.parts) and ":" in path.parts[0]  # C:/... from a Windows archiver
    if path.is_absolute() or ".." in path.parts or drive_like or not path.name:
        problems.append(f"archive member {name!r} points outside the archive")
        return None
    return path.name


def _extract_zip(archive: Path, into: Path, limits: UploadLimits, problems: list[str]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UploadError([f"the archive is not a valid zip file: {exc}"]) from exc
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if len(members) > limits.max_members:
            raise UploadError([f"the archive has {len(members)} files; at most {limits.max_members} are accepted"])
        budget = limits.max_bytes
        planned: list[tuple[zipfile.ZipInfo, str]] = []
        for member in members:
            name = _member_name(member.filename, problems)
            mode = member.external_attr >> 16
            if stat.S_ISLNK(mode):
                problems.append(f"archive member {member.filename!r} is a symbolic link")
                continue
            if name is not None:
                planned.append((member, name))
        if sum(m.file_size for m, _ in planned) > limits.max_bytes:
            raise UploadError([f"the archive expands beyond the upload limit of {limits.max_bytes} bytes"], status=413)
        if problems:
            return files
        for member, name in planned:
            if not _wanted(name, files, problems):
                continue
            with zf.open(member) as source:
                target = into / name
                budget -= _copy_capped(source, target, budget)
                files[name] = target
    return files


def _extract_tar(archive: Path, into: Path, limits: UploadLimits, problems: list[str]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    try:
        tf = tarfile.open(archive, mode="r:*")
    except (tarfile.TarError, OSError) as exc:
        raise UploadError([f"the archive is not a valid tar file: {exc}"]) from exc
    with tf:
        try:
            members = tf.getmembers()
        except (tarfile.TarError, EOFError, OSError) as exc:
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
            source = tf.extractfile(member)
            if source is None:
                continue
            with source:
                target = into / name
                budget -= _copy_capped(source, target, budget)
                files[name] = target
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
