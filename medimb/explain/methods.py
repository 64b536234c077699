"""The explainer of each attention method name (:data:`medimb.explain.settings.EXPLAINER_NAMES`)."""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn as nn

from .cam import CAMExplainer, GradCAMExplainer
from .coam import COAM, MultiScaleCOAM
from .settings import EXPLAINER_NAMES


class Explainer(Protocol):
    def __call__(self, x: torch.Tensor, class_idx: int | None = None) -> torch.Tensor:
        """``(B, C, *S)`` -> ``(B, 1, *S)`` map in [0, 1], 1 = attended."""

    def raw_map(self, x: torch.Tensor, class_idx: int | None = None) -> torch.Tensor:
        """``(B, C, *S)`` -> ``(B, 1, *S)`` the same map before scaling (``__call__`` min-max scales it)."""


EXPLAINERS: dict[str, Callable[[nn.Module], Explainer]] = {
    "coam": lambda model: COAM(model),
    "coam_cosine": lambda model: COAM(model, cosine=True),
    "cam": CAMExplainer,
    "gradcam": GradCAMExplainer,
    "gradcampp": lambda model: GradCAMExplainer(model, plus=True),
    "coam_ms": MultiScaleCOAM,  # last: EXPLAINER_NAMES' order numbers the DICOM result series (medimb.export)
}
assert tuple(EXPLAINERS) == EXPLAINER_NAMES, "register every explainer name in settings.EXPLAINER_NAMES"


def create_explainer(name: str, model: nn.Module) -> Explainer:
    """The explainer called ``name`` (one of :data:`EXPLAINERS`) for ``model``."""
    if name not in EXPLAINERS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(EXPLAINERS)}")
    return EXPLAINERS[name](model)
