"""Where the repository, its bundles and the shared real-data folder are."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "bundles"
#: ``../shared/data`` next to the repository, or ``$MEDIMB_SHARED_DATA``; tests that need it skip when absent
SHARED = Path(os.environ.get("MEDIMB_SHARED_DATA", REPO.parent / "shared" / "data"))


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (benchmarks/ is not a package), registered in ``sys.modules``
    because dataclasses look their module up while a class is built."""
    import importlib.util
    import sys

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
