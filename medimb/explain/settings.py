"""What a ``medimb explain`` run can be asked for, and its defaults: no torch here, so ``medimb explain
--help`` answers at once. The explainers themselves are registered in :mod:`medimb.explain.methods`."""

from __future__ import annotations

from dataclasses import dataclass, field

#: every attention method, by the name the CLI, the bundles and the benchmark use (append new ones: the order
#: numbers the DICOM result series, medimb.export.objects.series_number)
EXPLAINER_NAMES = ("coam", "coam_cosine", "cam", "gradcam", "gradcampp", "coam_ms")
DEFAULT_EXPLAINERS = ("coam", "gradcam", "cam")
#: methods that need no class weights or gradients
CLASS_FREE_EXPLAINERS = ("coam", "coam_cosine", "coam_ms")
#: label map / region: map >= this (maps are scaled to [0, 1])
DEFAULT_THRESHOLD = 0.5
#: heatmap values below this are transparent in Slicer and the PNGs
DISPLAY_THRESHOLD = 0.3
FOREGROUND_OPACITY = 0.4
#: what the previews and the Slicer scene show under the maps (besides a channel index)
BACKGROUNDS = ("first-post", "subtraction", "last")
DEFAULT_BACKGROUND = "first-post"
#: how maps are scaled to [0, 1]; "auto": "calibrated" when validation cases are given, else "per-case"
MAP_SCALES = ("auto", "per-case", "calibrated")
DEFAULT_MAP_SCALE = "auto"


def parse_explainers(text: str | None) -> list[str]:
    """``"coam,gradcam"`` -> ``["coam", "gradcam"]``; ``ValueError`` naming any unknown method."""
    if not text:
        return list(DEFAULT_EXPLAINERS)
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [m for m in names if m not in EXPLAINER_NAMES]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {unknown or text!r}; choose from {', '.join(EXPLAINER_NAMES)}")
    return list(dict.fromkeys(names))


def parse_background(text: str | int) -> str | int:
    """``"first-post"``, ``"subtraction"``, ``"last"`` or a channel index (``"2"`` -> ``2``); ``ValueError``
    otherwise."""
    if isinstance(text, int):
        value: str | int = text
    else:
        value = str(text).strip().lower()
        if value.lstrip("-").isdigit():
            value = int(value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"--background channel index must be >= 0, got {value}")
        return value
    if value not in BACKGROUNDS:
        raise ValueError(f"--background {text!r}: choose {', '.join(BACKGROUNDS)} or a channel index")
    return value


def background_channels(background: str | int, channels: int) -> tuple[int, ...]:
    """The input channel(s) the background is made of, for a model with ``channels`` input channels (DCE:
    the phases, pre-contrast first): ``(i,)`` for one channel, ``(post, pre) = (1, 0)`` for the subtraction.

    ``first-post`` is channel 1 (the first post-contrast phase), ``last`` the last channel; a one-channel
    model has only its one channel for them. ``ValueError`` for a channel index out of range, or a
    subtraction of a one-channel model.
    """
    background = parse_background(background)
    if background == "subtraction":
        if channels < 2:
            raise ValueError("--background subtraction needs a model with at least two input channels "
                             "(pre-contrast first, then the post-contrast phases)")
        return (1, 0)
    if background == "first-post":
        return (1,) if channels >= 2 else (0,)
    if background == "last":
        return (channels - 1,)
    if not 0 <= background < channels:
        raise ValueError(f"--background {background}: the model has {channels} input channel(s) "
                         f"(0..{channels - 1})")
    return (int(background),)


def background_tag(background: str | int, channels: int, names: list[str] | None = None) -> str:
    """The background's name in overlay file names (``<case>_<method>_on-<tag>.nii.gz``): ``subtraction``, the
    channel's datalist name (``phase-01``) or ``ch<i>`` when the channels have no (usable) names."""
    chosen = background_channels(background, channels)
    if len(chosen) == 2:
        return "subtraction"
    index = chosen[0]
    if names and len(names) == channels:
        name = "".join(c if c.isalnum() or c in ".-" else "-" for c in str(names[index])).strip("-.")
        # Slicer opens files whose name contains "label" or "seg" as label maps: not for heatmaps
        if name and "label" not in name.lower() and "seg" not in name.lower():
            return name
    return f"ch{index}"


@dataclass
class ExplainSettings:
    """Options of one explain run (one source of truth for the CLI's and the bundles' defaults)."""

    methods: list[str] = field(default_factory=lambda: list(DEFAULT_EXPLAINERS))
    threshold: float = DEFAULT_THRESHOLD
    display_threshold: float = DISPLAY_THRESHOLD
    opacity: float = FOREGROUND_OPACITY
    target_class: int | None = None  # None: explain each case's predicted class
    previews: bool = True
    #: a self-contained 3D Slicer scene per case (<case>.mrb: a copy of its background and maps) and
    #: load_in_slicer.py; off, the NIfTI overlays stay (File > Add Data in Slicer)
    scenes: bool = True
    #: the image under the maps: "first-post", "subtraction", "last" or a channel index (background_channels)
    background: str | int = DEFAULT_BACKGROUND
    #: "per-case" (min-max per map), "calibrated" (one scale per method from the validation cases) or "auto"
    map_scale: str = DEFAULT_MAP_SCALE
