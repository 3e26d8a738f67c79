"""The two S3 multipart steps ``tenants.storage.S3Store`` runs itself (instead of boto3's transfer
manager) so that it knows the upload id and can abort a failed upload, and find stale ones later.

S3 keeps the parts of a multipart upload that was neither completed nor aborted, invisible to
object listings, until someone aborts it; a process that dies mid-upload, or a server that is
down when the abort is sent, leaves one behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from datetime import datetime, timezone
from pathlib import Path

MULTIPART_THREADS = 4  # parts sent at once (each holds one chunk in memory)


def send_parts(client, bucket: str, key: str, path: Path, upload_id: str, chunk: int) -> list[dict]:
    """Upload ``path`` as the parts of multipart upload ``upload_id``, ``chunk`` bytes each,
    MULTIPART_THREADS at a time; return the part list CompleteMultipartUpload needs. On the first
    failure the parts not yet started are cancelled and that failure is raised once the running
    ones end (parts start in order, so every part before the failed one has started)."""
    numbers = range(1, -(-Path(path).stat().st_size // chunk) + 1)

    def send(number: int) -> dict:
        with open(path, "rb") as handle:
            handle.seek((number - 1) * chunk)
            body = handle.read(chunk)
        response = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body)
        return {"PartNumber": number, "ETag": response["ETag"]}

    with ThreadPoolExecutor(max_workers=max(1, min(MULTIPART_THREADS, len(numbers))),
                            thread_name_prefix="tailor-s3-part") as pool:
        futures = [pool.submit(send, n) for n in numbers]
        _done, not_started = wait(futures, return_when=FIRST_EXCEPTION)
        for future in not_started:
            future.cancel()
    return [future.result() for future in futures]  # raises the first failure, in part order


def _aware(moment: datetime) -> datetime:
    """A timestamp with a time zone (naive ones are UTC)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def stale_uploads(client, bucket: str, prefix: str, older_than: datetime) -> Iterator[dict]:
    """The unfinished multipart uploads (``Key``, ``UploadId``, ``Initiated``) under ``prefix``
    begun before ``older_than``, over every page of ListMultipartUploads."""
    paginator = client.get_paginator("list_multipart_uploads")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for upload in page.get("Uploads", ()):
            if _aware(upload["Initiated"]) < older_than:
                yield upload
