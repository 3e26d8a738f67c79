"""Object storage for adapter files: S3 (any S3-compatible server) or a local folder.

``BlobStore`` extends the engine's ``ObjectStore`` (put / get / delete / exists under server-made
keys) with what the platform needs: streaming a file from disk (multipart when large), deleting
everything under a prefix, listing keys, and removing the debris of interrupted uploads (stale S3
multipart uploads, stale temporary files of the local folder). Keys are always checked with ``check_key``: relative,
slash-separated ``[A-Za-z0-9._-]`` segments, never ``..``; they come from the server
(``tenants/{tenant}/adapters/{id}/...``), never from a user.

Errors: a missing key raises ``ObjectNotFoundError`` (from ``get``); an S3 server that cannot be
reached, times out or answers 5xx raises ``StoreUnavailableError`` (transient: the task queue
retries it); anything else the server refuses (wrong credentials, missing bucket) raises
``StoreError``.

A failed multipart upload is aborted at once (best effort, logged); when the server is down at
that moment the upload stays incomplete on the server (invisible to readers, but holding its parts)
until ``abort_stale_uploads`` (the clean-up job) finds it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from inference.adapters.object_store import LocalFolderStore, ObjectNotFoundError, ObjectStore, check_key
from tenants.s3_multipart import send_parts, stale_uploads

if TYPE_CHECKING:
    from tenants.settings import Settings

log = logging.getLogger(__name__)

MULTIPART_THRESHOLD = 16 << 20  # files above this are uploaded in parts
MULTIPART_CHUNK = 16 << 20  # S3 needs parts of at least 5 MiB (all but the last)
MAX_ATTEMPTS = 5  # botocore's tries of one request (standard retry mode, backoff with jitter)
DELETE_BATCH = 1000  # DeleteObjects accepts at most 1000 keys a call
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable",
                    "InternalError", "RequestTimeTooSkewed"}


class StoreError(RuntimeError):
    """The object store refused or failed an operation (credentials, permissions, missing bucket)."""


class StoreUnavailableError(StoreError):
    """The object store could not be reached or answered with a server error; worth retrying."""


class BlobStore(ObjectStore, Protocol):
    """An ``ObjectStore`` that can also stream files, delete prefixes and list keys."""

    def put_file(self, key: str, path: Path) -> None:
        """Store the file at ``path`` under ``key`` without reading it into memory at once."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix/``; return how many were deleted."""
        ...

    def list_keys(self, prefix: str) -> list[str]:
        """The keys under ``prefix/``, sorted."""
        ...

    def abort_stale_uploads(self, prefix: str, older_than: datetime) -> int:
        """Remove unfinished uploads under ``prefix/`` begun before ``older_than``; return how many."""
        ...


# --- local folder -------------------------------------------------------------------------------


class LocalBlobStore(LocalFolderStore):
    """``LocalFolderStore`` plus the ``BlobStore`` extras (the embedded default's object store)."""

    def put_file(self, key: str, path: Path) -> None:
        """Copy ``path`` to ``key`` atomically (temp file, fsync, rename), streaming it."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as source:
                shutil.copyfileobj(source, out, MULTIPART_CHUNK)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _files_under(self, prefix: str) -> list[Path]:
        folder = self._path(prefix)
        if not folder.is_dir():
            return []
        return [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".tmp-")]

    def list_keys(self, prefix: str) -> list[str]:
        """The keys of the files under the folder ``prefix`` (temporary files excluded), sorted."""
        return sorted(p.relative_to(self.root).as_posix() for p in self._files_under(prefix))

    def delete_prefix(self, prefix: str) -> int:
        """Remove the folder ``prefix`` with everything in it; return the number of objects removed."""
        count = len(self._files_under(prefix))
        folder = self._path(prefix)
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
        return count

    def abort_stale_uploads(self, prefix: str, older_than: datetime) -> int:
        """Delete the temporary files under ``prefix`` (a ``put_file`` that a crash interrupted)
        last written before ``older_than``; return how many."""
        folder = self._path(prefix)
        if not folder.is_dir():
            return 0
        cutoff = older_than.timestamp()
        removed = 0
        for path in folder.rglob(".tmp-*"):
            try:
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:  # finished or removed meanwhile
                continue
        return removed


# --- S3 -----------------------------------------------------------------------------------------


def _client_error_code(exc: Exception) -> tuple[str, int]:
    """(error code, HTTP status) of a botocore ClientError."""
    response = getattr(exc, "response", {}) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _is_not_found(exc: Exception) -> bool:
    code, status = _client_error_code(exc)
    return code in _NOT_FOUND_CODES or (status == 404 and code != "NoSuchBucket")


class S3Store:
    """Objects in one bucket of an S3-compatible server (AWS S3, SeaweedFS, MinIO, Ceph...), via boto3.

    ``path_style`` addresses buckets as ``endpoint/bucket/key`` (what self-hosted servers need)
    instead of ``bucket.endpoint/key``. Requests time out (connect 5 s, read 60 s) and botocore
    retries throttling, 5xx and connection errors itself (standard mode, 5 attempts) before
    an error reaches the caller. ``create_bucket`` makes the bucket at construction if missing.
    """

    def __init__(
        self,
        endpoint_url: str | None,
        bucket: str,
        region: str,
        access_key_id: str | None,
        secret_access_key: str | None,
        path_style: bool = True,
        create_bucket: bool = False,
        *,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        multipart_chunksize: int = MULTIPART_CHUNK,
        max_attempts: int = MAX_ATTEMPTS,
    ):
        import boto3
        from botocore.config import Config

        self.endpoint_url = endpoint_url
        self.bucket = bucket
        self.multipart_threshold = multipart_threshold
        self.multipart_chunksize = multipart_chunksize
        config = Config(
            region_name=region,
            signature_version="s3v4",
            s3={"addressing_style": "path" if path_style else "auto"},
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=5,
            read_timeout=60,
            # S3-compatible servers differ in their support of the newer default CRC checksums;
            # send and verify them only where the API requires it.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            config=config,
        )
        if create_bucket:
            self.ensure_bucket()

    def __repr__(self) -> str:
        return f"S3Store(endpoint_url={self.endpoint_url!r}, bucket={self.bucket!r})"

    @contextmanager
    def _errors(self, action: str, key: str = "") -> Iterator[None]:
        """Translate botocore/boto3 errors of ``action`` on ``key`` into this module's errors."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError

        where = f"{self.bucket}/{key}" if key else self.bucket
        try:
            yield
        except ClientError as exc:
            raise self._from_client_error(exc, action, where) from exc
        except S3UploadFailedError as exc:
            cause = exc.__context__
            if isinstance(cause, ClientError):
                raise self._from_client_error(cause, action, where) from exc
            raise StoreUnavailableError(f"S3 {action} {where} failed: {exc}") from exc
        except (ConnectionError, HTTPClientError) as exc:
            raise StoreUnavailableError(f"S3 {action} {where}: cannot reach {self.endpoint_url}: {exc}") from exc
        except BotoCoreError as exc:
            raise StoreError(f"S3 {action} {where} failed: {exc}") from exc

    @staticmethod
    def _from_client_error(exc: Exception, action: str, where: str) -> StoreError:
        code, status = _client_error_code(exc)
        message = f"S3 {action} {where} failed: {code or status} ({exc})"
        if status >= 500 or code in _TRANSIENT_CODES:
            return StoreUnavailableError(message)
        return StoreError(message)

    # --- ObjectStore ---------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` (one PUT; overwrites)."""
        check_key(key)
        with self._errors("put", key):
            self._client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def get(self, key: str) -> bytes:
        """The bytes under ``key``; ObjectNotFoundError if there are none."""
        from botocore.exceptions import ClientError

        check_key(key)
        with self._errors("get", key):
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _is_not_found(exc):
                    raise ObjectNotFoundError(key) from None
                raise
            with response["Body"] as body:
                return body.read()

    def delete(self, key: str) -> None:
        """Delete ``key`` (no error if it does not exist)."""
        check_key(key)
        with self._errors("delete", key):
            self._client.delete_object(Bucket=self.bucket, Key=key)

    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""
        from botocore.exceptions import ClientError

        check_key(key)
        with self._errors("head", key):
            try:
                self._client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _is_not_found(exc):
                    return False
                raise
        return True

    # --- BlobStore extras ----------------------------------------------------------------------

    def put_file(self, key: str, path: Path) -> None:
        """Upload the file at ``path`` to ``key``: one PUT up to the multipart threshold, else a
        multipart upload (parts sent in parallel) that is aborted if anything fails."""
        check_key(key)
        path = Path(path)
        if path.stat().st_size <= self.multipart_threshold:
            with self._errors("put", key), open(path, "rb") as body:
                self._client.put_object(Bucket=self.bucket, Key=key, Body=body)
            return
        with self._errors("create multipart upload", key):
            upload_id = self._client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        try:
            with self._errors("multipart upload", key):
                parts = send_parts(self._client, self.bucket, key, path, upload_id, self.multipart_chunksize)
                self._client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                       MultipartUpload={"Parts": parts})
        except BaseException:
            self._abort_upload(key, upload_id)
            raise

    def _abort_upload(self, key: str, upload_id: str) -> None:
        """Abort a failed multipart upload, best effort: if the server cannot be reached now, the
        clean-up job's ``abort_stale_uploads`` removes it later."""
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            log.info("aborted the failed multipart upload %s of %s/%s", upload_id, self.bucket, key)
        except Exception as exc:
            log.warning("could not abort the failed multipart upload %s of %s/%s (the clean-up job will): %s",
                        upload_id, self.bucket, key, exc)

    def abort_stale_uploads(self, prefix: str, older_than: datetime) -> int:
        """Abort the multipart uploads under ``prefix/`` begun before ``older_than`` (left by a
        process that died, or by a failure whose abort could not reach the server)."""
        aborted = 0
        with self._errors("list multipart uploads", prefix):
            for upload in stale_uploads(self._client, self.bucket, f"{check_key(prefix)}/", older_than):
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"],
                                                    UploadId=upload["UploadId"])
                log.info("aborted the stale multipart upload %s of %s/%s (begun %s)",
                         upload["UploadId"], self.bucket, upload["Key"], upload["Initiated"])
                aborted += 1
        return aborted

    def _iter_keys(self, prefix: str) -> Iterator[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{check_key(prefix)}/"):
            for item in page.get("Contents", ()):
                yield item["Key"]

    def list_keys(self, prefix: str) -> list[str]:
        """The keys under ``prefix/``, sorted (paginated: any number of keys)."""
        with self._errors("list", prefix):
            return sorted(self._iter_keys(prefix))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix/`` in batches of 1000; return how many were deleted."""
        keys = self.list_keys(prefix)
        for start in range(0, len(keys), DELETE_BATCH):
            self._delete_batch(keys[start:start + DELETE_BATCH], prefix)
        return len(keys)

    def _delete_batch(self, keys: list[str], prefix: str) -> None:
        with self._errors("delete", prefix):
            response = self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}
            )
        errors = response.get("Errors") or []
        if errors:
            first = errors[0]
            raise StoreError(
                f"S3 delete under {self.bucket}/{prefix}: {len(errors)} objects not deleted "
                f"(first: {first.get('Key')}: {first.get('Code')} {first.get('Message')})"
            )

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (idempotent; safe when several services race)."""
        from botocore.exceptions import ClientError

        with self._errors("head bucket"):
            try:
                self._client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if not _is_not_found(exc) and _client_error_code(exc)[0] != "NoSuchBucket":
                    raise
        self._create_bucket()

    def _create_bucket(self) -> None:
        from botocore.exceptions import ClientError

        region = self._client.meta.region_name
        kwargs = {"Bucket": self.bucket}
        if region and region != "us-east-1":  # us-east-1 refuses an explicit location constraint
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        with self._errors("create bucket"):
            try:
                self._client.create_bucket(**kwargs)
                log.info("created bucket %s at %s", self.bucket, self.endpoint_url)
            except ClientError as exc:
                if _client_error_code(exc)[0] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise


def make_object_store(settings: Settings) -> BlobStore:
    """The object store the settings name: an ``S3Store`` or a ``LocalBlobStore`` folder."""
    if settings.object_store == "s3":
        secret = settings.s3_secret_access_key
        return S3Store(
            endpoint_url=settings.s3_endpoint_url,
            bucket=settings.s3_bucket,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=secret.get_secret_value() if secret is not None else None,
            path_style=settings.s3_path_style,
            create_bucket=settings.s3_create_bucket,
        )
    return LocalBlobStore(settings.resolved_storage_dir)
