"""The object stores: S3Store against a real SeaweedFS, and LocalBlobStore, with the same tests."""

from __future__ import annotations

import hashlib
import os
from datetime import datetime, timedelta, timezone

import pytest

from inference.adapters.object_store import ObjectNotFoundError
from tenants.settings import Settings
from tenants.storage import LocalBlobStore, S3Store, StoreError, StoreUnavailableError, make_object_store

MiB = 1 << 20


def _s3_store(server, bucket: str, **kwargs) -> S3Store:
    return S3Store(server.endpoint_url, bucket, server.region, server.access_key_id, server.secret_access_key,
                   **kwargs)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """A BlobStore of each kind, empty (S3: a fresh bucket; multipart above 5 MiB)."""
    if request.param == "local":
        return LocalBlobStore(tmp_path / "objects")
    server = request.getfixturevalue("seaweedfs")
    return _s3_store(server, request.getfixturevalue("s3_bucket"), multipart_threshold=5 * MiB,
                     multipart_chunksize=5 * MiB)


def test_put_get_exists_delete(store):
    key = "tenants/t1/adapters/a1/adapter_config.json"
    assert not store.exists(key)
    store.put(key, b'{"r": 8}')
    assert store.exists(key)
    assert store.get(key) == b'{"r": 8}'
    store.put(key, b"replaced")
    assert store.get(key) == b"replaced"
    store.delete(key)
    assert not store.exists(key)
    store.delete(key)  # deleting a missing key is not an error


def test_missing_key_raises_object_not_found(store):
    with pytest.raises(ObjectNotFoundError):
        store.get("tenants/t1/adapters/nope/adapter_model.safetensors")


def test_put_file_streams_a_multi_megabyte_file(store, tmp_path):
    data = os.urandom(11 * MiB + 123)  # three parts of a 5 MiB multipart upload on S3
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(data)
    key = "tenants/t1/adapters/big/adapter_model.safetensors"
    store.put_file(key, path)
    assert hashlib.sha256(store.get(key)).digest() == hashlib.sha256(data).digest()
    if isinstance(store, S3Store):  # a multipart object's ETag ends in -<number of parts>
        etag = store._client.head_object(Bucket=store.bucket, Key=key)["ETag"]
        assert etag.strip('"').endswith("-3"), etag


def test_small_put_file(store, tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_bytes(b"{}")
    store.put_file("a/b/adapter_config.json", path)
    assert store.get("a/b/adapter_config.json") == b"{}"


def test_list_keys_and_delete_prefix(store):
    keys = [f"tenants/t1/adapters/a1/{name}" for name in ("adapter_config.json", "adapter_model.safetensors")]
    others = ["tenants/t1/adapters/a10/adapter_config.json", "tenants/t1/adapters/a2/adapter_config.json",
              "tenants/t2/adapters/a1/adapter_config.json"]
    for key in keys + others:
        store.put(key, key.encode())
    assert store.list_keys("tenants/t1/adapters/a1") == sorted(keys)  # a10 is not under a1/
    assert store.list_keys("tenants/t1") == sorted(keys + others[:2])
    assert store.list_keys("tenants/none") == []

    assert store.delete_prefix("tenants/t1/adapters/a1") == 2
    assert store.list_keys("tenants/t1/adapters/a1") == []
    assert all(store.exists(key) for key in others)
    assert store.delete_prefix("tenants/t1/adapters/a1") == 0


def test_delete_prefix_of_many_objects(store):
    for i in range(1005):  # more than one DeleteObjects batch and one listing page
        store.put(f"bulk/p/o{i:04d}", b"x")
    assert len(store.list_keys("bulk/p")) == 1005
    assert store.delete_prefix("bulk/p") == 1005
    assert store.list_keys("bulk") == []


@pytest.mark.parametrize("key", ["", "/abs", "../escape", "a/../b", "a//b", "a/./b", "with space", "a\\b",
                                 "tenants/t1/\x00", ".hidden", None])
def test_invalid_keys_are_refused(store, tmp_path, key):
    path = tmp_path / "f"
    path.write_bytes(b"x")
    operations = [
        lambda: store.put(key, b"x"), lambda: store.get(key), lambda: store.delete(key),
        lambda: store.exists(key), lambda: store.put_file(key, path), lambda: store.list_keys(key),
        lambda: store.delete_prefix(key),
    ]
    for operation in operations:
        with pytest.raises(ValueError, match="invalid object key"):
            operation()


def _unfinished_uploads(store) -> list[str]:
    """The keys of unfinished uploads: S3 multipart uploads, or the local store's temporary files."""
    if isinstance(store, S3Store):
        return [u["Key"] for u in store._client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])]
    return [p.relative_to(store.root).as_posix() for p in store.root.rglob(".tmp-*")]


def test_abort_stale_uploads(store):
    """Unfinished uploads begun before the cut-off are removed; newer ones and objects stay."""
    done = "tenants/t1/adapters/a1/adapter_model.safetensors"
    store.put(done, b"done")
    unfinished = "tenants/t1/adapters/a2/adapter_model.safetensors"
    if isinstance(store, S3Store):
        store._client.create_multipart_upload(Bucket=store.bucket, Key=unfinished)
    else:
        tmp = store.root / "tenants/t1/adapters/a2/.tmp-interrupted"
        tmp.parent.mkdir(parents=True)
        tmp.write_bytes(b"half an upload")
    assert len(_unfinished_uploads(store)) == 1
    now = datetime.now(timezone.utc)
    assert store.abort_stale_uploads("tenants", now - timedelta(hours=1)) == 0
    assert store.abort_stale_uploads("other", now + timedelta(seconds=5)) == 0
    assert len(_unfinished_uploads(store)) == 1
    assert store.abort_stale_uploads("tenants", now + timedelta(seconds=5)) == 1
    assert _unfinished_uploads(store) == [] and store.get(done) == b"done"
    assert store.list_keys("tenants/t1/adapters/a2") == []


# --- S3 only ------------------------------------------------------------------------------------


def test_a_failed_multipart_upload_is_aborted(seaweedfs, s3_bucket, tmp_path):
    """A part that fails (a 503 injected into part 3: a real server cannot be made to fail one
    chosen part) ends the upload with StoreUnavailableError and aborts it at once: no object and
    no unfinished multipart upload remain."""
    from botocore.exceptions import ClientError

    store = _s3_store(seaweedfs, s3_bucket, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_attempts=1)
    real_upload_part = store._client.upload_part
    sent: list[int] = []

    def failing_part_3(**kwargs):
        if kwargs["PartNumber"] == 3:
            raise ClientError({"Error": {"Code": "ServiceUnavailable", "Message": "injected"},
                               "ResponseMetadata": {"HTTPStatusCode": 503}}, "UploadPart")
        sent.append(kwargs["PartNumber"])
        return real_upload_part(**kwargs)

    store._client.upload_part = failing_part_3
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(os.urandom(14 * MiB))
    key = "tenants/t1/adapters/fails/adapter_model.safetensors"
    with pytest.raises(StoreUnavailableError, match="ServiceUnavailable"):
        store.put_file(key, path)
    assert 3 not in sent
    assert _unfinished_uploads(store) == []
    assert not store.exists(key)


def test_wrong_credentials_are_refused(seaweedfs, s3_bucket):
    good = _s3_store(seaweedfs, s3_bucket)
    good.put("k/v", b"secret data")
    wrong_secret = S3Store(seaweedfs.endpoint_url, s3_bucket, seaweedfs.region, seaweedfs.access_key_id,
                           "not-the-right-secret-at-all")
    unknown_key = S3Store(seaweedfs.endpoint_url, s3_bucket, seaweedfs.region, "nosuchkeyid",
                          seaweedfs.secret_access_key)
    for store in (wrong_secret, unknown_key):
        with pytest.raises(StoreError) as info:
            store.get("k/v")
        assert not isinstance(info.value, StoreUnavailableError)
        with pytest.raises(StoreError):
            store.put("k/w", b"x")
        with pytest.raises(StoreError):
            store.exists("k/v")
    assert not good.exists("k/w")


def test_ensure_bucket_is_idempotent(seaweedfs):
    import uuid

    from support.service_fixtures import empty_bucket

    name = f"tailor-ensure-{uuid.uuid4().hex[:8]}"
    store = _s3_store(seaweedfs, name, create_bucket=True)
    try:
        store.ensure_bucket()
        _s3_store(seaweedfs, name, create_bucket=True).put("a/b", b"1")
        assert store.get("a/b") == b"1"
    finally:
        empty_bucket(seaweedfs.client(), name)


def test_missing_bucket_is_a_store_error_not_a_missing_key(seaweedfs):
    store = _s3_store(seaweedfs, "tailor-no-such-bucket")
    with pytest.raises(StoreError):
        store.get("a/b")


def test_unreachable_server_is_unavailable(seaweedfs):
    from support.service_fixtures import free_ports

    (port,) = free_ports(1)
    store = S3Store(f"http://127.0.0.1:{port}", "bucket", "us-east-1", "k", "s")
    with pytest.raises(StoreUnavailableError):
        store.get("a/b")


def test_make_object_store(tmp_path, seaweedfs, s3_bucket):
    local = make_object_store(Settings(storage_dir=tmp_path / "objs"))
    assert isinstance(local, LocalBlobStore) and local.root == tmp_path / "objs"
    s3 = make_object_store(Settings(
        object_store="s3", s3_endpoint_url=seaweedfs.endpoint_url, s3_bucket=s3_bucket,
        s3_access_key_id=seaweedfs.access_key_id, s3_secret_access_key=seaweedfs.secret_access_key,
    ))
    assert isinstance(s3, S3Store)
    s3.put("x/y", b"z")
    assert s3.get("x/y") == b"z"
    assert seaweedfs.secret_access_key not in repr(s3)


def test_adapter_keys_are_made_in_one_place_and_read_back():
    from inference.adapters.storage_keys import (
        adapter_file_keys,
        engine_adapter_prefix,
        tenant_adapter_of,
        tenant_adapter_prefix,
    )

    prefix = tenant_adapter_prefix("t" * 32, "a" * 32)
    assert prefix == f"tenants/{'t' * 32}/adapters/{'a' * 32}"
    keys = adapter_file_keys(prefix)
    assert keys == (f"{prefix}/adapter_config.json", f"{prefix}/adapter_model.safetensors")
    assert tenant_adapter_of(keys.weights) == (prefix, "a" * 32)
    for other in ("tenants/t/adapters/a", "tenants/t/other/a/x", "elsewhere/t/adapters/a/x", "tenants//adapters/a/x"):
        assert tenant_adapter_of(other) is None, other
    assert engine_adapter_prefix("adapters", "alice", "f" * 64) == f"adapters/alice/{'f' * 32}"
