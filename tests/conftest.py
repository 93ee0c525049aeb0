"""Tests run on one thread (the machines are shared; see DEVELOPERS.md)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _import_transformers_hub_glue() -> None:
    """transformers >= 5 imports the PyPI `kernels` package (hub kernels) as soon as a model config loads;
    pytest puts the repo root on sys.path, where our `kernels/` folder (installed as `sgl.kernels`) would
    shadow it. Import that glue once with the root off sys.path; sys.modules then keeps the right one."""
    import importlib
    import importlib.util
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if importlib.util.find_spec("transformers") is None:
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != root]
    try:
        importlib.import_module("transformers.integrations.hub_kernels")
    except Exception:  # an older transformers without it: nothing to shadow
        pass
    finally:
        sys.path[:] = saved


_import_transformers_hub_glue()
