"""The search backends, by the ``search.backend`` name that selects each: the one registry.

A backend dispatches trials and lets the trial lifecycle start and finish each one (see
``lifecycle.Backend``). A new backend is a module in this package and one entry in
``BACKENDS``; ``tests/test_backends.py`` runs every entry through the same checks.
"""

from __future__ import annotations

from slimsearch.errors import registered
from slimsearch.search.lifecycle import Backend
from slimsearch.search.local_backend import LocalBackend
from slimsearch.search.ray_backend import RayBackend

BACKENDS: dict[str, Backend] = {b.name: b for b in (LocalBackend(), RayBackend())}


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ``ConfigError`` naming ``search.backend`` when there is
    none."""
    return registered(BACKENDS, "search.backend", name)
