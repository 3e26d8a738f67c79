"""The tenant domain: models, repositories, services, object storage and background tasks.

Empty until the platform work lands (REST API, PostgreSQL metadata, S3 storage, Celery
validation); the engine in ``inference/`` does not depend on it.
"""
