"""Contrast-enhancement time curves of the tissues in a synthetic DCE study.

Each curve is the enhancement at the acquisition times, scaled so its largest value over the sampled
post-contrast times is 1 (a tissue's amplitude is applied separately). Shapes follow the clinical
BI-RADS kinetic types: persistent (type I, still rising at the last phase), plateau (type II) and
wash-out (type III, peaks early and falls). Malignant lesions wash out; but so do the heart and
arteries, which is why kinetics alone do not identify the class.
"""

from __future__ import annotations

import numpy as np

#: kinetic types and the ranges their parameters are drawn from:
#: tau_in (s, wash-in time constant), k_out (1/s, wash-out rate; negative = still rising)
KINETIC_TYPES = {
    "washout": {"tau_in": (15.0, 40.0), "k_out": (1 / 500, 1 / 220)},
    "plateau": {"tau_in": (25.0, 60.0), "k_out": (-1 / 4000, 1 / 4000)},
    "persistent": {"tau_in": (120.0, 260.0), "k_out": (-1 / 1500, 0.0)},
    "blood": {"tau_in": (6.0, 15.0), "k_out": (1 / 900, 1 / 400)},
}


def enhancement_curve(kind: str, times_s: np.ndarray, rng: np.random.Generator,
                      ranges: dict | None = None) -> np.ndarray:
    """Enhancement ``(P,)`` at ``times_s`` ``(P,)`` (0 = contrast injection; the pre-contrast phase
    has time 0 and enhancement 0), normalised to a peak of 1 over the post-contrast phases.

    ``e(t) = (1 - exp(-t / tau_in)) * exp(-k_out * t)``, with parameters drawn for ``kind``;
    ``ranges`` replaces some of its ranges (e.g. ``{"k_out": (lo, hi)}``), the same draws from other ranges.
    """
    params = {**KINETIC_TYPES[kind], **(ranges or {})}
    tau_in = rng.uniform(*params["tau_in"])
    k_out = rng.uniform(*params["k_out"])
    t = np.asarray(times_s, dtype=float)
    curve = (1.0 - np.exp(-t / tau_in)) * np.exp(-k_out * t)
    curve[t <= 0] = 0.0
    peak = curve.max()
    return curve / peak if peak > 0 else curve
