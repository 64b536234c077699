"""The package's layers: every import (module level or inside a function) points down or sideways, never up.

    data_prep  (no torch, no medimb)
    medimb.errors, atomic, lazy, runtime       base
    medimb.data                                 datasets, transforms, datalists
    medimb.networks, medimb.losses              models and losses
    medimb.evaluation                           prediction, metrics, the evaluation output
    medimb.training                             engines, handlers, the two-stage workflow
    medimb.explain, medimb.export               attention maps and overlays; overlays as DICOM results
    medimb.commands, cli, bundle, __main__      entry points: the CLI and the MONAI bundles' glue
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = (
    ("medimb", "medimb.errors", "medimb.atomic", "medimb.lazy", "medimb.runtime", "medimb.validation"),
    ("medimb.data",),
    ("medimb.networks", "medimb.losses"),
    ("medimb.evaluation",),
    ("medimb.training",),
    ("medimb.explain", "medimb.export"),
    ("medimb.commands", "medimb.cli", "medimb.bundle", "medimb.__main__"),
)


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix naming ``module``'s package or module."""
    best = (-1, -1)
    for index, names in enumerate(LAYERS):
        for name in names:
            if module == name or module.startswith(name + "."):
                best = max(best, (len(name), index))
    assert best[1] >= 0, f"{module} is in no layer: add it to LAYERS"
    return best[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return found


MEDIMB_FILES = sorted((REPO / "medimb").rglob("*.py"))


@pytest.mark.parametrize("path", MEDIMB_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_imports_a_layer_above_its_own(path):
    own = layer_of(module_name(path))
    upward = [f"line {line}: {name} (layer {layer_of(name)} > {own})"
              for line, name in imported_modules(path)
              if (name == "medimb" or name.startswith("medimb.")) and name != "medimb" and layer_of(name) > own]
    assert not upward, f"{module_name(path)} imports upward: " + "; ".join(upward)


@pytest.mark.parametrize("path", sorted((REPO / "data_prep").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_data_prep_imports_neither_torch_nor_medimb(path):
    bad = [f"line {line}: {name}" for line, name in imported_modules(path)
           if name.split(".")[0] in ("torch", "monai", "medimb")]
    assert not bad, f"{path.name}: " + "; ".join(bad)


def test_help_loads_no_torch_or_monai():
    """``medimb --help`` builds every subcommand's parser from light modules only (answers at once), and what
    ``main`` runs before every command (quieting library warnings) imports no torch either, so a command that
    needs none (``medimb export-dicom``) does not pay for it."""
    code = ("import sys; from medimb.cli import build_parser; build_parser(); "
            "from medimb.runtime import quiet_library_warnings; quiet_library_warnings(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'monai', 'ignite', 'sklearn')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout
