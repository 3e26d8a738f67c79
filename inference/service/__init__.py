"""The inference service: the engine wrapped for the platform (an in-process core that the
embedded default calls directly, and an internal HTTP API that the api service calls)."""
