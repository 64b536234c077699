"""One name per attention method, so the CLI, the benchmark and the exporter share a single list."""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn as nn

from .cam import CAMExplainer, GradCAMExplainer
from .coam import COAM


class Explainer(Protocol):
    def __call__(self, x: torch.Tensor, class_idx: int | None = None) -> torch.Tensor:
        """``(B, C, *S)`` -> ``(B, 1, *S)`` map in [0, 1], 1 = attended."""


METHODS: dict[str, Callable[[nn.Module], Explainer]] = {
    "coam": lambda model: COAM(model),
    "coam_cosine": lambda model: COAM(model, cosine=True),
    "cam": CAMExplainer,
    "gradcam": GradCAMExplainer,
    "gradcampp": lambda model: GradCAMExplainer(model, plus=True),
}
DEFAULT_METHODS = ("coam", "gradcam", "cam")


def parse_methods(text: str | None) -> list[str]:
    """``"coam,gradcam"`` -> ``["coam", "gradcam"]``; ``ValueError`` naming any unknown method."""
    if not text:
        return list(DEFAULT_METHODS)
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {unknown or text!r}; choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


def create_explainer(name: str, model: nn.Module) -> Explainer:
    """The explainer called ``name`` (one of :data:`METHODS`) for ``model``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name](model)
