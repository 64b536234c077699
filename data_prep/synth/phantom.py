"""Breast DCE-MRI-like phantoms: anatomy, lesions, enhancing distractors, kinetics, texture, bias, noise.

One case is a 3D field of view over one breast (axial: rows run anterior -> posterior, so the breast
is at the top of the image and the chest wall, heart and lungs at the bottom), acquired before
contrast and at ``post_phases`` times after it. Arrays are ``(P, Z, Y, X)`` = (phase, slice, row,
column) in arbitrary scanner units (>= 0).

Class 1 (malignant): an irregular mass with spicules and rim-heavy enhancement that washes in fast
and washes out. Class 0: a smooth oval mass with persistent (sometimes plateau) enhancement, or no
lesion. Both classes contain the same distractors: arteries (fast wash-in and wash-out, like cancer,
but tubular), small round benign foci, background parenchymal enhancement, chest-wall muscle and the
heart's blood pool. At the ``hard`` level (:data:`DIFFICULTIES`) the blood pool is the brightest thing
in the field of view, lesion size and brightness are drawn from the same ranges for both classes, and
scanner gain, bias field and noise vary per case, so intensity statistics of the subtraction image do not
give the class away; shape and time course do. The default ``standard`` level makes the cancer larger and
the brightest early enhancement and the distractors fainter: learnable from a few dozen cases.

The lesion family (:data:`LESION_FAMILIES`, ``--lesions``) gives localisation a second task: ``single`` (the
default) draws one malignant mass, ``multifocal`` draws 2-3 smaller spiculated foci of one cancer in the same
region of the breast, all in the truth mask, with about the total volume of a single mass (so the lesion is
not simply larger). Class-0 cases are the same in both families.

All anatomy is laid out in units of ``L`` = half the in-plane field of view, so a 32x32 test phantom
looks like a coarser 64x64 one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from data_prep.synth.geometry import SeriesGeometry, make_geometry, rotation_matrix
from data_prep.synth.kinetics import enhancement_curve

LESION_TYPES = ("malignant", "benign", "none")
#: the ``--lesions`` families of ``medimb-prep synth``: how the malignant lesion is laid out
LESION_FAMILIES = ("single", "multifocal")
#: multifocal: focus centres at least this many focus radii apart (separate enhancing foci with tissue between)
#: and at most this much further (x L: one region of the breast, as multifocal, not multicentric, cancer)
FOCUS_SEPARATION = 3.0
FOCUS_SPREAD = 0.5


@dataclass(frozen=True)
class Difficulty:
    """The ranges of everything that makes the classification task hard (uniform ``(low, high)`` draws;
    integer ranges are ``(low, high)`` with ``high`` exclusive, as ``Generator.integers``).

    The levels draw the geometry, phase times and anatomy from the same random numbers for a seed (the
    distractor counts then differ, so later draws do); ``hard`` is the phantom as it was before the levels
    existed (same arrays for the same seed).
    """

    vessels: tuple[int, int]  # number of distractor arteries
    vessel_radius: tuple[float, float]  # x L
    vessel_enhancement: tuple[float, float]
    foci: tuple[int, int]  # number of small benign foci
    focus_enhancement: tuple[float, float]
    focus_kinetics: tuple[float, float, float]  # probabilities of persistent, plateau, washout foci
    bpe: tuple[float, float]  # background parenchymal enhancement
    heart_enhancement: tuple[float, float]  # the blood pool's peak enhancement
    malignant_radius: tuple[float, float]  # x L
    benign_radius_factor: tuple[float, float]  # benign radius = a malignant-range radius x this
    malignant_enhancement: tuple[float, float]
    benign_enhancement: tuple[float, float]
    washout_rate: tuple[float, float]  # k_out of malignant lesions (1/s), KINETIC_TYPES["washout"] for hard
    bias: tuple[float, float]  # amplitude of the coil bias field
    gain: tuple[float, float]  # scanner gain
    noise: tuple[float, float]  # Rician noise sigma as a fraction of the fat signal


#: the ``--difficulty`` levels of ``medimb-prep synth`` (docs/synthetic_archive.md lists what differs)
DIFFICULTIES = {
    # the benchmarks' setting: distractors that enhance and wash out like cancer, lesion enhancement drawn from
    # the same range for both classes, benign masses larger than malignant ones
    "hard": Difficulty(
        vessels=(2, 6), vessel_radius=(0.025, 0.05), vessel_enhancement=(600, 1400),
        foci=(1, 6), focus_enhancement=(250, 900), focus_kinetics=(0.6, 0.3, 0.1), bpe=(20, 350),
        heart_enhancement=(1000, 1800),
        malignant_radius=(0.14, 0.32), benign_radius_factor=(1.2, 1.6),
        malignant_enhancement=(300, 900), benign_enhancement=(300, 900), washout_rate=(1 / 500, 1 / 220),
        bias=(0.08, 0.25), gain=(0.7, 1.4), noise=(0.01, 0.03),
    ),
    # learnable from a few dozen cases: fewer, thinner, fainter vessels; fewer, fainter foci that never wash
    # out; milder background enhancement; a dimmer blood pool; a larger malignant mass, the brightest
    # enhancement in the image, that washes out faster, and smaller, fainter benign masses; less bias, gain and
    # noise variation
    "standard": Difficulty(
        vessels=(1, 3), vessel_radius=(0.02, 0.03), vessel_enhancement=(200, 450),
        foci=(0, 3), focus_enhancement=(100, 300), focus_kinetics=(0.8, 0.2, 0.0), bpe=(20, 100),
        heart_enhancement=(700, 1000),
        malignant_radius=(0.24, 0.34), benign_radius_factor=(0.7, 1.0),
        malignant_enhancement=(1300, 1800), benign_enhancement=(200, 400), washout_rate=(1 / 300, 1 / 180),
        bias=(0.03, 0.08), gain=(0.9, 1.1), noise=(0.005, 0.01),
    ),
}


@dataclass(frozen=True)
class PhantomConfig:
    """Size and timing of the synthetic studies (one source of truth for their defaults)."""

    matrix: int = 64  # rows = columns
    slices: int = 28  # nominal slice count; each case draws from slices +- slice_jitter
    slice_jitter: int = 4
    post_phases: int = 3  # post-contrast phases (the pre-contrast phase comes in addition)
    first_post_s: float = 90.0  # mid-acquisition time of the first post-contrast phase
    phase_interval_s: float = 90.0
    oblique_fraction: float = 0.3  # share of cases with a tilted (oblique) slice orientation
    benign_lesion_fraction: float = 0.6  # share of class-0 cases that have a benign mass
    difficulty: str = "standard"  # a key of DIFFICULTIES
    lesions: str = "single"  # one of LESION_FAMILIES

    def __post_init__(self) -> None:
        if self.difficulty not in DIFFICULTIES:
            raise ValueError(f"--difficulty must be one of {', '.join(DIFFICULTIES)}, got {self.difficulty!r}")
        if self.lesions not in LESION_FAMILIES:
            raise ValueError(f"--lesions must be one of {', '.join(LESION_FAMILIES)}, got {self.lesions!r}")
        if self.matrix < 16:
            raise ValueError(f"--matrix must be at least 16, got {self.matrix}")
        if self.slices - self.slice_jitter < 8:
            raise ValueError(f"--slices must be at least 8 (+ slice_jitter {self.slice_jitter}), got {self.slices}")
        if self.post_phases < 2:
            raise ValueError(f"--post-phases must be at least 2, got {self.post_phases}")


@dataclass
class Case:
    """One synthesised study (before it is written as DICOM)."""

    label: int  # 1 malignant, 0 benign or no lesion
    lesion_type: str  # one of LESION_TYPES
    lesion_kinetics: str  # "washout" / "persistent" / "plateau" / "" (no lesion)
    geometry: SeriesGeometry
    phase_times_s: np.ndarray  # (P,) seconds after injection; 0 for the pre-contrast phase
    phases: np.ndarray  # (P, Z, Y, X) float32 signal, pre-contrast first
    lesion_mask: np.ndarray  # (Z, Y, X) bool; all False when there is no lesion
    lesion_radius_mm: float = 0.0  # of each focus for a multifocal lesion
    extras: dict = field(default_factory=dict)  # distractor counts etc., for the truth table
    focus_centres_zyx: list = field(default_factory=list)  # (3,) voxel index of each lesion (focus) centre

    @property
    def lesion_centre_ras(self) -> np.ndarray | None:
        """(3,) centre of mass of the lesion mask in RAS mm, or None without a lesion."""
        if not self.lesion_mask.any():
            return None
        centre_zyx = np.array(ndimage.center_of_mass(self.lesion_mask))
        return self.geometry.zyx_to_ras(centre_zyx)


def _smooth_noise(rng: np.random.Generator, shape, sigma_vox) -> np.ndarray:
    """Gaussian-smoothed white noise with unit standard deviation, float32 ``shape``.

    Wide kernels are applied on a grid coarsened by an integer factor (~3 voxels per sigma), which is
    then expanded by repetition and lightly blurred: the same kind of field at a fraction of the cost.
    """
    sigma = np.broadcast_to(np.asarray(sigma_vox, dtype=float), (len(shape),))
    factor = np.maximum(1, (sigma / 3.0).astype(int))
    coarse = tuple(int(np.ceil(n / f)) for n, f in zip(shape, factor))
    field_ = ndimage.gaussian_filter(rng.standard_normal(coarse, dtype=np.float32), sigma / factor, truncate=3.0)
    if np.any(factor > 1):
        for axis, f in enumerate(factor):
            field_ = np.repeat(field_, f, axis=axis)
        field_ = field_[tuple(slice(0, n) for n in shape)]
        field_ = ndimage.gaussian_filter(field_, factor / 2.0, truncate=2.0)
    return (field_ - field_.mean()) / (field_.std() + 1e-12)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


class _Grid:
    """Voxel-centre coordinates of a phantom (or of a box inside it) in mm from voxel 0 ``(z, y, x)``
    and in units of ``L`` from the phantom's centre ``(w, v, u)``; all broadcastable to ``shape``."""

    def __init__(self, geometry: SeriesGeometry, box: tuple[slice, ...] | None = None):
        full = geometry.shape
        box = box or tuple(slice(0, n) for n in full)
        self.box = box
        self.shape = tuple(b.stop - b.start for b in box)
        self.spacing = np.array(geometry.spacing_zyx)
        self.L = full[2] * geometry.pixel_spacing[1] / 2
        self.geometry = geometry
        idx = np.ogrid[tuple(slice(b.start, b.stop) for b in box)]
        self.mm = [(i * s).astype(np.float32) for i, s in zip(idx, self.spacing)]
        self.centre_mm = (np.array(full) - 1) / 2 * self.spacing
        self.w, self.v, self.u = [((m - c) / self.L).astype(np.float32) for m, c in zip(self.mm, self.centre_mm)]
        self.w_max = full[0] * self.spacing[0] / 2 / self.L

    def around(self, centre_mm: np.ndarray, half_extent_mm: float) -> "_Grid":
        """The sub-grid of the box of half-width ``half_extent_mm`` around ``centre_mm`` (clipped)."""
        lo = np.floor((np.asarray(centre_mm) - half_extent_mm) / self.spacing).astype(int)
        hi = np.ceil((np.asarray(centre_mm) + half_extent_mm) / self.spacing).astype(int) + 1
        full = self.geometry.shape
        box = tuple(slice(int(max(0, a)), int(min(n, b))) for a, b, n in zip(lo, hi, full))
        return _Grid(self.geometry, box)

    def norm_to_mm(self, wvu: np.ndarray) -> np.ndarray:
        """``(..., 3)`` normalised ``(w, v, u)`` -> mm ``(z, y, x)`` from voxel 0."""
        return np.asarray(wvu) * self.L + self.centre_mm

    def sigma_vox(self, sigma_mm: float) -> np.ndarray:
        """An isotropic smoothing width in mm as per-axis voxels."""
        return sigma_mm / self.spacing

    def tubes(self, polylines: list[np.ndarray], radii_mm: list[float], edge_mm: float) -> np.ndarray:
        """Soft weight ``(Z, Y, X)`` in [0, 1] of tubes around polylines (each ``(N, 3)`` mm zyx)."""
        free = np.ones(self.shape, dtype=bool)
        radius_at = np.zeros(self.shape, dtype=np.float32)
        for points, radius in zip(polylines, radii_mm):
            idx = np.round(points / self.spacing).astype(int) - [b.start for b in self.box]
            inside = np.all((idx >= 0) & (idx < np.array(self.shape)), axis=1)
            idx = idx[inside]
            if len(idx) == 0:
                continue
            free[tuple(idx.T)] = False
            radius_at[tuple(idx.T)] = np.maximum(radius_at[tuple(idx.T)], radius)
        if free.all():
            return np.zeros(self.shape, dtype=np.float32)
        dist, nearest = ndimage.distance_transform_edt(free, sampling=self.spacing, return_indices=True)
        radius = radius_at[tuple(nearest)]
        return _sigmoid((radius - dist) / edge_mm).astype(np.float32)


def _random_unit(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    vec = rng.standard_normal((n, 3))
    return vec / np.linalg.norm(vec, axis=1, keepdims=True)


def _walk(rng, start, direction, length, step, wiggle) -> np.ndarray:
    """A smooth random walk ``(N, 3)`` from ``start`` along ``direction`` (same units)."""
    points = [np.asarray(start, dtype=float)]
    d = np.asarray(direction, dtype=float) / np.linalg.norm(direction)
    for _ in range(max(2, int(length / step))):
        d = d + wiggle * rng.standard_normal(3)
        d /= np.linalg.norm(d)
        points.append(points[-1] + step * d)
    return np.array(points)


def _draw_geometry(rng: np.random.Generator, config: PhantomConfig, oblique: bool | None) -> SeriesGeometry:
    slices = int(rng.integers(config.slices - config.slice_jitter, config.slices + config.slice_jitter + 1))
    d_inplane = float(rng.choice([0.7, 0.75, 0.8, 0.85, 0.9]))
    slice_step = float(rng.choice([1.5, 2.0, 2.5, 3.0]))
    rotation = None
    tilt = rng.random() < config.oblique_fraction
    if tilt if oblique is None else oblique:
        axis = rng.choice([[0, 0, 1], [1, 0, 0], [0, 1, 0], [1, 0, 1]])
        rotation = rotation_matrix(np.array(axis, dtype=float), rng.uniform(6, 20) * rng.choice([-1, 1]))
    # where the table put the breast: a few cm around the isocentre (LPS mm), varying per case
    centre = np.array([rng.uniform(-90, 90), rng.uniform(-60, 0), rng.uniform(-80, 60)])
    return make_geometry(
        (slices, config.matrix, config.matrix), (d_inplane, d_inplane), slice_step, centre, rotation
    )


def _place(rng: np.random.Generator, room_mm: np.ndarray, needed_mm: float) -> tuple[np.ndarray, float]:
    """A random voxel index ``(3,)`` whose distance to the breast boundary is at least ``needed_mm``;
    when nothing has that much room, the roomiest voxel and the room it has."""
    candidates = np.argwhere(room_mm >= needed_mm)
    if len(candidates):
        return candidates[rng.integers(len(candidates))].astype(float), needed_mm
    best = np.unravel_index(np.argmax(room_mm), room_mm.shape)
    return np.array(best, dtype=float), float(room_mm[best])


def _embed(grid: _Grid, sub: _Grid, *arrays: np.ndarray) -> list[np.ndarray]:
    """Arrays computed on ``sub`` placed into zero arrays of ``grid``'s shape."""
    out = []
    for array in arrays:
        full = np.zeros(grid.shape, dtype=np.float32)
        full[sub.box] = array
        out.append(full)
    return out


def _place_apart(rng: np.random.Generator, room_mm: np.ndarray, needed_mm: float, taken: list[np.ndarray],
                 spacing: np.ndarray, min_mm: float, max_mm: float) -> tuple[np.ndarray, float]:
    """Like :func:`_place`, and at ``min_mm``-``max_mm`` from the nearest of the ``taken`` voxel indices (each
    ``(3,)``); relaxes to ``>= min_mm`` only, then to :func:`_place`, when no voxel qualifies."""
    candidates = np.argwhere(room_mm >= needed_mm)
    if len(candidates) and taken:
        dist = np.min([np.linalg.norm((candidates - t) * spacing, axis=1) for t in taken], axis=0)
        for ok in ((dist >= min_mm) & (dist <= max_mm), dist >= min_mm):
            if ok.any():
                chosen = candidates[ok]
                return chosen[rng.integers(len(chosen))].astype(float), needed_mm
    return _place(rng, room_mm, needed_mm)


def _malignant_mass(rng, grid: _Grid, centre_mm, radius_mm) -> tuple[np.ndarray, np.ndarray]:
    """Irregular spiculated mass: (weight (Z,Y,X) in [0,1], enhancement multiplier (Z,Y,X))."""
    sub = grid.around(centre_mm, 2.6 * radius_mm + 2.0)
    dz, dy, dx = [m - c for m, c in zip(sub.mm, centre_mm)]
    rho = np.sqrt(dz**2 + dy**2 + dx**2) / radius_mm
    irregular = rho + rng.uniform(0.25, 0.45) * _smooth_noise(rng, sub.shape, sub.sigma_vox(0.35 * radius_mm))
    body = _sigmoid((1.0 - irregular) * radius_mm / 0.35)
    spicules = []
    for direction in _random_unit(rng, int(rng.integers(4, 11))):
        start = centre_mm + 0.8 * radius_mm * direction
        length = rng.uniform(0.7, 1.5) * radius_mm
        spicules.append(_walk(rng, start, direction, length, step=0.3, wiggle=0.08))
    spicule_r = [rng.uniform(0.015, 0.03) * grid.L] * len(spicules)
    spic = sub.tubes(spicules, spicule_r, edge_mm=0.3)
    weight = np.maximum(body, 0.75 * spic)
    # rim enhancement: the centre of many cancers enhances less than the periphery
    rim = rng.uniform(0.0, 0.6)
    multiplier = 1.0 - rim * np.clip(1.0 - rho, 0.0, 1.0)
    multiplier = multiplier * (1.0 + 0.15 * _smooth_noise(rng, sub.shape, sub.sigma_vox(0.2 * radius_mm)))
    weight, multiplier = _embed(grid, sub, weight, multiplier)
    return weight, multiplier


def _benign_mass(rng, grid: _Grid, centre_mm, radius_mm, texture: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Smooth oval mass (fibroadenoma-like, or a small focus): (weight (Z,Y,X) in [0,1], enhancement
    multiplier (Z,Y,X), mildly textured when ``texture``)."""
    sub = grid.around(centre_mm, radius_mm + 2.0)
    axes = radius_mm * np.array([1.0, rng.uniform(0.55, 0.9), rng.uniform(0.55, 0.9)])
    rot = rotation_matrix(_random_unit(rng)[0], rng.uniform(0, 180))
    offsets = [m - c for m, c in zip(sub.mm, centre_mm)]
    local = [sum(rot[r, c] * offsets[c] for c in range(3)) / axes[r] for r in range(3)]
    rho = np.sqrt(sum(comp**2 for comp in local))
    weight = _sigmoid((1.0 - rho) * radius_mm / 0.35)
    multiplier = np.ones(sub.shape, dtype=np.float32)
    if texture:
        multiplier = multiplier + 0.06 * _smooth_noise(rng, sub.shape, sub.sigma_vox(0.5 * radius_mm))
    weight, multiplier = _embed(grid, sub, weight, multiplier)
    return weight, multiplier


def synthesize_case(
    rng: np.random.Generator, label: int, config: PhantomConfig = PhantomConfig(), oblique: bool | None = None
) -> Case:
    """Draw one study of class ``label`` (1 malignant, 0 benign/no lesion) from ``rng``; ``oblique``
    forces a tilted (True) or straight axial (False) orientation, None draws it.

    Returns a :class:`Case` whose ``phases`` is ``(1 + post_phases, Z, Y, X)`` float32.
    """
    if label not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {label!r}")
    level = DIFFICULTIES[config.difficulty]
    geometry = _draw_geometry(rng, config, oblique)
    grid = _Grid(geometry)
    shape = geometry.shape
    u, v, w = grid.u, grid.v, grid.w
    n_post = config.post_phases
    times = np.concatenate(
        [[0.0], config.first_post_s + config.phase_interval_s * np.arange(n_post) + rng.uniform(-8, 8, n_post)]
    )
    components: list[tuple[np.ndarray, np.ndarray]] = []  # (amplitude map (Z,Y,X), curve (P,))

    # --- anatomy (pre-contrast signal, T1-weighted without fat suppression: fat is bright)
    cw0 = rng.uniform(0.25, 0.45)
    chest_wall = cw0 + 0.15 * u**2  # v of the chest wall surface
    breast_ellipsoid = (u / rng.uniform(0.95, 1.3)) ** 2 + ((v - chest_wall) / (cw0 + rng.uniform(0.85, 1.05))) ** 2
    breast_ellipsoid = breast_ellipsoid + (w / (grid.w_max * rng.uniform(1.2, 1.8))) ** 2
    breast = (breast_ellipsoid < 1.0) & (v < chest_wall)
    muscle_depth = rng.uniform(0.12, 0.2)
    muscle = (v >= chest_wall) & (v < chest_wall + muscle_depth) & np.ones(shape, dtype=bool)
    heart_centre = (rng.uniform(-0.5, 0.5), cw0 + muscle_depth + rng.uniform(0.25, 0.5), rng.uniform(-0.3, 0.3) * grid.w_max)
    heart_r = (rng.uniform(0.55, 0.8), rng.uniform(0.35, 0.5), rng.uniform(0.7, 1.0))
    heart_rho = np.sqrt(
        ((u - heart_centre[0]) / heart_r[0]) ** 2
        + ((v - heart_centre[1]) / heart_r[1]) ** 2
        + ((w - heart_centre[2]) / heart_r[2]) ** 2
    )
    heart = _sigmoid((1.0 - heart_rho) / 0.05) * (v >= chest_wall + muscle_depth)
    thorax = (v >= chest_wall + muscle_depth) & np.ones(shape, dtype=bool)

    fat_level = rng.uniform(700, 900)
    fgt_level = rng.uniform(330, 450)
    pre = np.zeros(shape, dtype=np.float32)
    pre[breast] = fat_level
    pre[muscle] = rng.uniform(300, 380)
    pre[thorax] = 40.0  # lung
    pre = pre * (1 - heart) + 220.0 * heart
    pre = ndimage.gaussian_filter(pre, grid.sigma_vox(0.6))  # soft tissue boundaries

    # fibroglandular tissue: thresholded smooth noise, denser centrally, volume fraction varies per case
    fgt_field = _smooth_noise(rng, shape, grid.sigma_vox(0.12 * grid.L))
    fgt_field = fgt_field + 0.8 * np.exp(-(u**2 + (v - (cw0 - 0.5)) ** 2) / 0.3)
    threshold = np.quantile(fgt_field[breast], 1.0 - rng.uniform(0.15, 0.55)) if breast.any() else np.inf
    fgt = _sigmoid((fgt_field - threshold) / 0.15) * breast
    pre = pre * (1 - fgt) + fgt_level * fgt
    pre = pre * (1.0 + 0.05 * _smooth_noise(rng, shape, 0.8))  # fine texture

    bpe = rng.uniform(*level.bpe) * fgt * (1.0 + 0.3 * _smooth_noise(rng, shape, grid.sigma_vox(0.05 * grid.L)))
    components.append((bpe, enhancement_curve("persistent", times, rng)))
    components.append((rng.uniform(40, 120) * muscle, enhancement_curve("plateau", times, rng)))
    components.append((rng.uniform(*level.heart_enhancement) * heart, enhancement_curve("blood", times, rng)))

    # room to the breast boundary (the field-of-view edge counts as boundary), to place things inside
    room = ndimage.distance_transform_edt(np.pad(breast, 1), sampling=grid.spacing)[1:-1, 1:-1, 1:-1]

    # --- arteries: tubes from the chest wall towards the nipple, wash in fast and wash out like cancer
    n_vessels = int(rng.integers(*level.vessels))
    vessels, vessel_r = [], []
    for _ in range(n_vessels):
        u0, w0 = rng.uniform(-0.8, 0.8), rng.uniform(-0.9, 0.9) * grid.w_max
        start = np.array([w0, cw0 + 0.15 * u0**2 - 0.02, u0])
        direction = np.array([rng.normal(0, 0.2), -1.0, rng.normal(0, 0.5)])
        path = _walk(rng, start, direction, rng.uniform(0.8, 1.6), step=0.03, wiggle=0.12)
        vessels.append(grid.norm_to_mm(path))
        vessel_r.append(rng.uniform(*level.vessel_radius) * grid.L)
    vessel = grid.tubes(vessels, vessel_r, edge_mm=0.35) * breast
    pre = pre * (1 - vessel) + 250.0 * vessel
    components.append((rng.uniform(*level.vessel_enhancement) * vessel, enhancement_curve("blood", times, rng)))

    # --- benign foci in every case: small, round, mostly persistent
    n_foci = int(rng.integers(*level.foci))
    for _ in range(n_foci):
        radius = rng.uniform(0.04, 0.09) * grid.L
        at, radius = _place(rng, room, radius * 1.2)
        weight, _ = _benign_mass(rng, grid, at * grid.spacing, max(radius / 1.2, 0.5), texture=False)
        kind = rng.choice(["persistent", "plateau", "washout"], p=list(level.focus_kinetics))
        pre = pre * (1 - weight) + fgt_level * weight
        components.append((rng.uniform(*level.focus_enhancement) * weight, enhancement_curve(str(kind), times, rng)))

    # --- the lesion that decides the class
    if label == 1:
        lesion_type = "malignant"
    else:
        lesion_type = "benign" if rng.random() < config.benign_lesion_fraction else "none"
    lesion_mask = np.zeros(shape, dtype=bool)
    radius_mm, kinetics, focus_centres = 0.0, "", []
    if lesion_type != "none":
        radius_mm = rng.uniform(*level.malignant_radius) * grid.L * (
            1.0 if lesion_type == "malignant" else rng.uniform(*level.benign_radius_factor))
        if lesion_type == "malignant" and config.lesions == "multifocal":
            pre, lesion_mask, radius_mm, focus_centres = _multifocal_cancer(
                rng, grid, room, pre, components, times, level, radius_mm)
            kinetics = "washout"
        else:
            at, room_mm = _place(rng, room, 1.3 * radius_mm)
            radius_mm = room_mm / 1.3
            centre_mm = at * grid.spacing
            focus_centres = [at]
            if lesion_type == "malignant":
                weight, multiplier = _malignant_mass(rng, grid, centre_mm, radius_mm)
                kinetics = "washout"
            else:
                weight, multiplier = _benign_mass(rng, grid, centre_mm, radius_mm)
                kinetics = str(rng.choice(["persistent", "plateau"], p=[0.75, 0.25]))
            pre = pre * (1 - weight) + rng.uniform(330, 450) * weight
            peak = level.malignant_enhancement if lesion_type == "malignant" else level.benign_enhancement
            rate = {"k_out": level.washout_rate} if lesion_type == "malignant" else None
            components.append(
                (rng.uniform(*peak) * weight * multiplier, enhancement_curve(kinetics, times, rng, rate)))
            lesion_mask = weight >= 0.5

    # --- acquisition: contrast uptake, coil bias field, scanner gain, Rician noise per phase
    signal = np.repeat(pre[None], len(times), axis=0)
    for amplitude, curve in components:
        signal += curve[:, None, None, None].astype(np.float32) * amplitude[None]
    gradient = rng.normal(0, 1, 3)
    bias = 1.0 + rng.uniform(*level.bias) * (
        (gradient[0] * w + gradient[1] * v + gradient[2] * u) / np.linalg.norm(gradient)
        + 0.5 * _smooth_noise(rng, shape, grid.sigma_vox(0.6 * grid.L))
    )
    gain = rng.uniform(*level.gain)
    signal *= (gain * np.clip(bias, 0.5, 1.6))[None].astype(np.float32)
    sigma = rng.uniform(*level.noise) * fat_level * gain
    real = signal + rng.normal(0, sigma, signal.shape).astype(np.float32)
    imag = rng.normal(0, sigma, signal.shape).astype(np.float32)
    phases = np.sqrt(real**2 + imag**2).astype(np.float32)

    return Case(
        label=int(label),
        lesion_type=lesion_type,
        lesion_kinetics=kinetics,
        geometry=geometry,
        phase_times_s=times,
        phases=phases,
        lesion_mask=lesion_mask,
        lesion_radius_mm=float(radius_mm),
        extras={"vessels": n_vessels, "foci": n_foci},
        focus_centres_zyx=[np.asarray(c, dtype=float) for c in focus_centres],
    )


def _multifocal_cancer(rng, grid: _Grid, room: np.ndarray, pre: np.ndarray, components: list, times: np.ndarray,
                       level: Difficulty, radius_mm: float) -> tuple[np.ndarray, np.ndarray, float, list]:
    """2-3 spiculated foci of one cancer (``multifocal`` family) added to ``pre`` and ``components``.

    Each focus has radius ``radius_mm / cbrt(n)`` (the foci together about as large as one mass of
    ``radius_mm``), its own peak enhancement from the level's malignant range and the case's one washout
    curve (one tumour biology), centres :data:`FOCUS_SEPARATION` focus radii to that plus
    :data:`FOCUS_SPREAD` L from the nearest other focus. Returns (pre, the union mask ``(Z, Y, X)`` of every
    focus's ``weight >= 0.5``, the focus radius in mm, the focus centres as voxel indices).
    """
    n = int(rng.integers(2, 4))
    focus_r = radius_mm / np.cbrt(n)
    curve = enhancement_curve("washout", times, rng, {"k_out": level.washout_rate})
    mask = np.zeros(grid.shape, dtype=bool)
    centres: list[np.ndarray] = []
    radii = []
    for _ in range(n):
        min_mm = FOCUS_SEPARATION * focus_r
        at, room_mm = _place_apart(rng, room, 1.3 * focus_r, centres, grid.spacing, min_mm,
                                   min_mm + FOCUS_SPREAD * grid.L)
        r = room_mm / 1.3
        weight, multiplier = _malignant_mass(rng, grid, at * grid.spacing, r)
        pre = pre * (1 - weight) + rng.uniform(330, 450) * weight
        components.append((rng.uniform(*level.malignant_enhancement) * weight * multiplier, curve))
        mask |= weight >= 0.5
        centres.append(at)
        radii.append(r)
    return pre, mask, float(np.mean(radii)), centres
