"""Test sessions from the repository root import the drt_fast that has compiled kernels.

`python -m pytest` (and pytest's own rootdir handling) put the repository root first on
sys.path, and there ``drt_fast/`` is the source tree: after a plain ``pip install .`` it
has no compiled ``_C``, so every test would fail with "drt_fast._C ... is missing". When
the source tree has no ``_C`` built for this interpreter and an installed drt_fast exists
elsewhere on sys.path, the root leaves sys.path and the installed copy is tested. An
in-place build (``pip install -e .``, ``setup.py build_ext --inplace``) keeps the source
tree.
"""
import importlib.machinery
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))


def _built_in_place() -> bool:
    package = os.path.join(ROOT, "drt_fast")
    return any(os.path.exists(os.path.join(package, "_C" + suffix))
               for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def _is_root(entry: str) -> bool:
    return os.path.abspath(entry or os.curdir) == ROOT


if "drt_fast" not in sys.modules and not _built_in_place():
    others = [entry for entry in sys.path if not _is_root(entry)]
    if importlib.machinery.PathFinder.find_spec("drt_fast", others) is not None:
        sys.path[:] = others
