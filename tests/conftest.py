"""Tests run on one thread (the machines are shared; see DEVELOPERS.md)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _import_pypi_kernels_first() -> None:
    """transformers >= 5.25 depends on PyPI's `kernels` package and imports it when it is installed;
    our source folder `kernels/` (installed as `sgl.kernels`) would shadow it whenever the repository
    root is on sys.path (pytest puts it there). Import the real one first, with the root masked."""
    import importlib
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != root]
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass  # not installed: transformers does not look for it either
    finally:
        sys.path[:] = saved


_import_pypi_kernels_first()
