"""Repository functions on SQLite and PostgreSQL: tenant isolation, API keys, unique constraints."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from tenants import repositories as repo
from tenants.db import session_scope
from tenants.models import AdapterStatus, ApiKey


def _tenant(factory, label: str = "t") -> str:
    with session_scope(factory) as s:
        return repo.create_tenant(s, f"{label}-{uuid.uuid4().hex[:8]}", system_prompt="Be brief.").id


def test_tenant_isolation(session_factory):
    a, b = _tenant(session_factory, "a"), _tenant(session_factory, "b")
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with session_scope(session_factory) as s:
        user = repo.create_user(s, a, "alice")
        adapter = repo.create_adapter(s, a, "style", 1, owner_user_id=user.id, rank=8, target_modules=["q_proj"])
        conv = repo.create_conversation(s, a, user.id)
        repo.add_message(s, a, conv.id, "user", "secret of A", created_at=t0)
        repo.set_current_adapter(s, a, user.id, adapter.id)
        user_id, adapter_id, conv_id = user.id, adapter.id, conv.id

    with session_scope(session_factory) as s:
        assert repo.get_user(s, a, user_id).current_adapter_id == adapter_id
        assert [m.content for m in repo.recent_messages(s, a, user_id, 10)] == ["secret of A"]
        # tenant B sees none of it, even knowing the ids
        assert repo.get_user(s, b, user_id) is None
        assert repo.get_user_by_external_id(s, b, "alice") is None
        assert repo.get_adapter(s, b, adapter_id) is None
        assert repo.list_adapters(s, b) == []
        assert repo.get_conversation(s, b, conv_id) is None
        assert repo.recent_messages(s, b, user_id, 10) == []
        # nor can it write through them
        with pytest.raises(repo.NotFound):
            repo.add_message(s, b, conv_id, "user", "injected")
        with pytest.raises(repo.NotFound):
            repo.create_adapter(s, b, "steal", 1, owner_user_id=user_id)
        with pytest.raises(repo.NotFound):
            repo.set_current_adapter(s, b, user_id, None)
        b_user = repo.create_user(s, b, "bob")
        with pytest.raises(repo.NotFound):
            repo.set_current_adapter(s, b, b_user.id, adapter_id)


def test_api_key_secret_shown_once_and_hashed(session_factory):
    a, b = _tenant(session_factory), _tenant(session_factory)
    with session_scope(session_factory) as s:
        key, secret = repo.create_api_key(s, a, "chat")
        key_id = key.id
        assert secret.startswith(f"tk_{key.prefix}_") and len(secret) > 40
        row = s.execute(select(ApiKey.__table__).where(ApiKey.id == key_id)).one()._asdict()
        assert all(secret not in str(value) for value in row.values())  # only prefix + hash stored
        assert key.key_hash == repo.hash_api_key(secret) != secret

    with session_scope(session_factory) as s:
        found = repo.find_api_key(s, secret)
        assert found is not None and found.id == key_id and found.tenant_id == a and found.scope == "chat"
        assert repo.find_api_key(s, secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
        assert repo.find_api_key(s, secret, pepper="another-pepper") is None
        assert repo.find_api_key(s, "garbage") is None
        assert repo.find_api_key(s, f"tk_{'0' * 12}_nope") is None
        assert [k.id for k in repo.list_api_keys(s, a)] == [key_id]
        assert not repo.revoke_api_key(s, b, key_id)  # another tenant cannot revoke it

    with session_scope(session_factory) as s:
        assert repo.revoke_api_key(s, a, key_id)
        assert not repo.revoke_api_key(s, a, key_id)
    with session_scope(session_factory) as s:
        assert repo.find_api_key(s, secret) is None
        assert repo.list_api_keys(s, a) == []
        assert len(repo.list_api_keys(s, a, include_revoked=True)) == 1

    with pytest.raises(IntegrityError), session_scope(session_factory) as s:
        repo.create_api_key(s, a, "superuser")  # scope CHECK constraint


def test_constant_time_equals():
    assert repo.constant_time_equals("abc", "abc")
    assert not repo.constant_time_equals("abc", "abd")
    assert not repo.constant_time_equals(b"abc", "abcd")


def test_unique_external_id_per_tenant(session_factory):
    a, b = _tenant(session_factory), _tenant(session_factory)
    with session_scope(session_factory) as s:
        first = repo.create_user(s, a, "ext-1")
        repo.create_user(s, b, "ext-1")  # the same external id in another tenant is fine
        assert repo.get_or_create_user(s, a, "ext-1").id == first.id
    with pytest.raises(IntegrityError), session_scope(session_factory) as s:
        repo.create_user(s, a, "ext-1")


def test_unique_adapter_name_version_per_tenant(session_factory):
    a, b = _tenant(session_factory), _tenant(session_factory)
    with session_scope(session_factory) as s:
        repo.create_adapter(s, a, "persona", 1, rank=4, target_modules=["q_proj", "v_proj"], size_bytes=123)
        repo.create_adapter(s, a, "persona", 2, status="ready")
        repo.create_adapter(s, b, "persona", 1)
        old = repo.create_adapter(s, a, "old", 1)
        repo.set_adapter_status(s, a, old.id, "deleted")
    with pytest.raises(IntegrityError), session_scope(session_factory) as s:
        repo.create_adapter(s, a, "persona", 1)
    with session_scope(session_factory) as s:
        listed = repo.list_adapters(s, a)
        assert [(x.name, x.version) for x in listed] == [("persona", 2), ("persona", 1)]
        assert listed[1].target_modules == ["q_proj", "v_proj"] and listed[1].size_bytes == 123
        assert [x.version for x in repo.list_adapters(s, a, status="ready")] == [2]
        assert len(repo.list_adapters(s, a, include_deleted=True)) == 3


def test_recent_messages_pages_a_users_history(session_factory):
    a = _tenant(session_factory)
    t0 = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)
    with session_scope(session_factory) as s:
        alice, bob = repo.create_user(s, a, "alice"), repo.create_user(s, a, "bob")
        c1, c2 = repo.create_conversation(s, a, alice.id), repo.create_conversation(s, a, alice.id)
        other = repo.create_conversation(s, a, bob.id)
        for i in range(6):
            conv = c1 if i % 2 == 0 else c2
            role = "user" if i % 2 == 0 else "assistant"
            repo.add_message(s, a, conv.id, role, f"m{i}", token_count=i, created_at=t0 + timedelta(minutes=i))
        repo.add_message(s, a, other.id, "user", "bob's", created_at=t0 + timedelta(minutes=10))
        alice_id, c1_id = alice.id, c1.id
    with session_scope(session_factory) as s:
        assert [m.content for m in repo.recent_messages(s, a, alice_id, 3)] == ["m3", "m4", "m5"]
        page = repo.recent_messages(s, a, alice_id, 3, before=t0 + timedelta(minutes=3))
        assert [m.content for m in page] == ["m0", "m1", "m2"]
        assert [m.content for m in repo.recent_messages(s, a, alice_id, 10, conversation_id=c1_id)] == ["m0", "m2", "m4"]
    with pytest.raises(IntegrityError), session_scope(session_factory) as s:
        repo.add_message(s, a, c1_id, "robot", "bad role")


def test_adapter_queries_the_routes_use_stay_inside_the_tenant(session_factory):
    a, b = _tenant(session_factory, "a"), _tenant(session_factory, "b")
    with session_scope(session_factory) as s:
        alice = repo.create_user(s, a, "alice")
        v1 = repo.create_adapter(s, a, "style", 1, status=AdapterStatus.READY, idempotency_key="k1")
        v2 = repo.create_adapter(s, a, "style", repo.next_adapter_version(s, a, "style"), status=AdapterStatus.READY)
        repo.create_adapter(s, a, "style", repo.next_adapter_version(s, a, "style"))  # v3, pending
        repo.create_adapter(s, b, "style", 1, status=AdapterStatus.READY)
        repo.set_current_adapter(s, a, alice.id, v2.id)
        v1_id, v2_id, alice_id = v1.id, v2.id, alice.id

    with session_scope(session_factory) as s:
        assert repo.next_adapter_version(s, a, "style") == 4 and repo.next_adapter_version(s, a, "new") == 1
        assert repo.latest_ready_adapter(s, a, "style").id == v2_id
        assert repo.latest_ready_adapter(s, a, "other") is None
        assert repo.ready_adapter_names(s, a) == ["style"]
        assert repo.get_adapter_by_idempotency_key(s, a, "k1").id == v1_id
        assert repo.get_adapter_by_idempotency_key(s, b, "k1") is None
        # statuses read back as the enum, equal to the stored strings
        status = repo.get_adapter(s, a, v2_id).status
        assert status is AdapterStatus.READY and status == "ready"
        # tenant B can neither delete nor mark deleted A's adapters
        assert repo.mark_adapter_deleted(s, b, v2_id) is None
        assert repo.delete_adapter_row(s, b, v1_id) is False
        assert [u.external_id for u in repo.list_users(s, b)] == []

    with session_scope(session_factory) as s:
        assert repo.mark_adapter_deleted(s, a, v2_id).status is AdapterStatus.DELETED
        assert repo.mark_adapter_deleted(s, a, v2_id) is None  # already deleted
        assert repo.get_user(s, a, alice_id).current_adapter_id is None  # unassigned with it
        assert repo.latest_ready_adapter(s, a, "style").id == v1_id
        assert repo.delete_adapter_row(s, a, v1_id) is True
        assert [u.external_id for u in repo.list_users(s, a, external_id="alice")] == ["alice"]
        assert repo.set_system_prompt(s, a, None).system_prompt is None
        assert repo.tenant_names(s)[a].startswith("a-")
