"""The clean-up job on SQLite and a local folder store (the same code runs as a Celery task)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tenants import migrate
from tenants import repositories as repo
from tenants.cleanup import PeriodicCleanup, cleanup_job
from tenants.db import session_scope
from tenants.models import Adapter, utcnow
from tenants.platform import Platform, adapter_prefix
from tenants.settings import Settings
from tenants.storage import LocalBlobStore


@pytest.fixture
def platform(tmp_path):
    settings = Settings(data_dir=tmp_path)
    migrate.upgrade(settings.resolved_database_url)
    p = Platform.from_settings(settings, store=LocalBlobStore(tmp_path / "objects"))
    yield p
    p.close()


def _adapter(platform, tenant_id, name, status, age_s=0.0, files=True) -> str:
    with session_scope(platform.session_factory) as session:
        adapter = repo.create_adapter(session, tenant_id, name, 1, status=status)
        adapter.created_at = utcnow() - timedelta(seconds=age_s)
        adapter.storage_key = adapter_prefix(tenant_id, adapter.id)
        adapter_id = adapter.id
    if files:
        platform.store.put(f"{adapter_prefix(tenant_id, adapter_id)}/adapter_config.json", b"{}")
        platform.store.put(f"{adapter_prefix(tenant_id, adapter_id)}/adapter_model.safetensors", b"x")
    return adapter_id


def _status(platform, adapter_id) -> tuple[str, str | None, str | None]:
    with session_scope(platform.session_factory) as session:
        a = session.get(Adapter, adapter_id)
        return a.status, a.failure_reason, a.storage_key


def test_cleanup_repairs_what_crashes_leave_behind(platform):
    with session_scope(platform.session_factory) as session:
        tenant_id = repo.create_tenant(session, "cleanup").id
    fresh = _adapter(platform, tenant_id, "fresh", "pending", age_s=10)
    lost = _adapter(platform, tenant_id, "lost", "pending", age_s=600)
    ancient = _adapter(platform, tenant_id, "ancient", "pending", age_s=7200)
    deleted = _adapter(platform, tenant_id, "deleted", "deleted")
    ready = _adapter(platform, tenant_id, "ready", "ready")
    orphan = f"{adapter_prefix(tenant_id, 'f' * 32)}/adapter_model.safetensors"
    platform.store.put(orphan, b"orphan")
    submitted: list[str] = []

    report = cleanup_job(platform, submitted.append, requeue_after_s=300, give_up_after_s=3600)

    assert submitted == [lost] and report.requeued == [lost]
    assert report.timed_out == [ancient]
    status, reason, _ = _status(platform, ancient)
    assert status == "failed" and "did not finish" in reason
    assert _status(platform, fresh)[0] == "pending" and _status(platform, lost)[0] == "pending"
    # the timed-out adapter's files go at once; the deleted one's by the leftover sweep
    assert platform.store.list_keys(adapter_prefix(tenant_id, ancient)) == []
    assert platform.store.list_keys(adapter_prefix(tenant_id, deleted)) == []
    assert _status(platform, deleted)[2] is None
    assert report.files_removed == 2 and report.orphans_removed == 1 and not platform.store.exists(orphan)
    assert len(platform.store.list_keys(adapter_prefix(tenant_id, ready))) == 2
    assert len(platform.store.list_keys(adapter_prefix(tenant_id, fresh))) == 2

    again = cleanup_job(platform, submitted.append, requeue_after_s=300, give_up_after_s=3600)
    assert (again.timed_out, again.files_removed, again.orphans_removed) == ([], 0, 0)


def test_periodic_cleanup_runs_and_survives_failures():
    import threading

    calls: list[int] = []
    ran_twice = threading.Event()

    def job():
        calls.append(1)
        if len(calls) >= 2:
            ran_twice.set()
        raise RuntimeError("store outage")

    cleaner = PeriodicCleanup(job, 0.01).start()
    try:
        assert ran_twice.wait(5)
    finally:
        cleaner.stop()
    PeriodicCleanup(job, 0).start().stop()  # 0 disables it


def test_cleanup_removes_stale_unfinished_uploads(platform):
    """A temporary file that an interrupted put_file left (the local store's unfinished upload) is
    removed once it is older than stale_upload_after_s; a fresh one (an upload in progress) stays."""
    import os
    import time

    folder = platform.store.root / "tenants" / "t" / "adapters" / ("e" * 32)
    folder.mkdir(parents=True)
    stale, fresh = folder / ".tmp-stale", folder / ".tmp-fresh"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    old = time.time() - 7200
    os.utime(stale, (old, old))

    report = cleanup_job(platform, lambda _id: None, stale_upload_after_s=1800)

    assert report.uploads_aborted == 1 and not stale.exists() and fresh.exists()


def test_cleanup_aborts_stale_multipart_uploads_on_s3(tmp_path, seaweedfs, s3_bucket):
    """On S3 an unfinished multipart upload is invisible to object listings; clean-up aborts it
    once it is old enough, along with the objects that have no row."""
    from tenants.storage import S3Store

    settings = Settings(data_dir=tmp_path)
    migrate.upgrade(settings.resolved_database_url)
    store = S3Store(seaweedfs.endpoint_url, s3_bucket, seaweedfs.region, seaweedfs.access_key_id,
                    seaweedfs.secret_access_key)
    p = Platform.from_settings(settings, store=store)
    try:
        prefix = adapter_prefix("t" * 32, "f" * 32)
        store.put(f"{prefix}/adapter_config.json", b"{}")  # what a failed upload could not remove
        store._client.create_multipart_upload(Bucket=s3_bucket, Key=f"{prefix}/adapter_model.safetensors")

        young = cleanup_job(p, lambda _id: None)  # the upload could still be running: it stays
        assert young.orphans_removed == 1 and young.uploads_aborted == 0
        later = cleanup_job(p, lambda _id: None, now=utcnow() + timedelta(hours=1))
        assert later.uploads_aborted == 1
        assert store._client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
        assert store.list_keys("tenants") == []
    finally:
        p.close()
