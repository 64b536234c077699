"""What a ``medimb explain`` run can be asked for, and its defaults: no torch here, so ``medimb explain
--help`` answers at once. The explainers themselves are registered in :mod:`medimb.explain.methods`."""

from __future__ import annotations

from dataclasses import dataclass, field

#: every attention method, by the name the CLI, the bundles and the benchmark use
EXPLAINER_NAMES = ("coam", "coam_cosine", "cam", "gradcam", "gradcampp")
DEFAULT_EXPLAINERS = ("coam", "gradcam", "cam")
#: methods that need no class weights or gradients
CLASS_FREE_EXPLAINERS = ("coam", "coam_cosine")
#: label map / region: map >= this (maps are scaled to [0, 1])
DEFAULT_THRESHOLD = 0.5
#: heatmap values below this are transparent in Slicer and the PNGs
DISPLAY_THRESHOLD = 0.3
FOREGROUND_OPACITY = 0.4


def parse_explainers(text: str | None) -> list[str]:
    """``"coam,gradcam"`` -> ``["coam", "gradcam"]``; ``ValueError`` naming any unknown method."""
    if not text:
        return list(DEFAULT_EXPLAINERS)
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [m for m in names if m not in EXPLAINER_NAMES]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {unknown or text!r}; choose from {', '.join(EXPLAINER_NAMES)}")
    return list(dict.fromkeys(names))


@dataclass
class ExplainSettings:
    """Options of one explain run (one source of truth for the CLI's and the bundles' defaults)."""

    methods: list[str] = field(default_factory=lambda: list(DEFAULT_EXPLAINERS))
    threshold: float = DEFAULT_THRESHOLD
    display_threshold: float = DISPLAY_THRESHOLD
    opacity: float = FOREGROUND_OPACITY
    target_class: int | None = None  # None: explain each case's predicted class
    previews: bool = True
