"""The e2e `mesh` fixture (tests/e2e/conftest.py), for the reliability tests too."""

from __future__ import annotations

import importlib.util
import os

# tests/e2e is not a package: load its conftest under a name of its own.
_spec = importlib.util.spec_from_file_location(
    "rose_e2e_mesh_fixture", os.path.join(os.path.dirname(__file__), os.pardir, "e2e", "conftest.py")
)
_e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_e2e)
mesh = _e2e.mesh
