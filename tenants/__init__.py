"""The tenant domain: the platform's metadata layer. The engine in ``inference/`` does not depend on it.

Built so far: ``tenants.models`` (SQLAlchemy 2 models: tenants, API keys, users, adapters,
conversations, messages), ``tenants.db`` (engines, sessions), ``tenants.migrate`` (Alembic
upgrade/downgrade; scripts in ``migrations/``) and ``tenants.repositories`` (tenant-scoped
queries, API keys stored as prefix + HMAC). The REST API, S3 storage and Celery tasks that use
them are not built yet.
"""
