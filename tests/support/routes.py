"""The routes a FastAPI app really serves, as ``(METHOD, path)`` pairs.

``app.routes`` holds plain routes and, in newer FastAPI releases, ``_IncludedRouter`` wrappers
around each included router; both are flattened here so that tests can compare the served
routes with their own tables (a new route then fails such a test until it is covered).
"""

from __future__ import annotations

from collections.abc import Iterator


def _leaves(routes) -> Iterator[tuple[object, str]]:
    for route in routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if contexts is not None:  # FastAPI >= 0.16x: an included router
            for context in contexts():
                yield context.original_route, context.path or getattr(context.original_route, "path", "")
        elif hasattr(route, "routes") and not hasattr(route, "methods"):  # a Mount or a router
            prefix = getattr(route, "path", "")
            for leaf, path in _leaves(route.routes):
                yield leaf, prefix + path
        else:
            yield route, getattr(route, "path", "")


def served_routes(app) -> set[tuple[str, str]]:
    """Every ``(METHOD, path)`` the app answers (HEAD, added beside GET automatically, left out)."""
    served = set()
    for route, path in _leaves(app.routes):
        for method in getattr(route, "methods", None) or ():
            if method != "HEAD":
                served.add((method, path))
    return served
