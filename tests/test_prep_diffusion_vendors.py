"""Canon, Toshiba, UIH and GE (ROW, scaled b) DWI gradients against dcm2niix (data_prep.diffusion).

dcm2niix (v1.0.20260724) reads a Canon gradient (Manufacturer ``CA...``: ``CANON_MEC``, ``Canon Medical
Systems``) in the image frame with GE's rules, whether it comes from DiffusionGradientOrientation
(0018,9089) or, on classic files without it, from the ImageComments text ``b=1000(x,y,z)`` (first two
components swapped); Toshiba's DiffusionGradientOrientation stays LPS. Canon and Toshiba tag only the
diffusion-weighted images: the untagged ones are the b=0 volumes. Every synthetic series here (4x4
images, 3 slices) is also converted by dcm2niix and compared: the .bval text, the .bvec in the written
file's frame (within 1e-4), the volume order and, end to end, the world-space gradients.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_prep_diffusion as base  # noqa: E402  (the synthetic-series helpers of the vendor tests)
from test_prep_diffusion import (  # noqa: E402
    AXIAL, CORONAL, FLIP_J, OBLIQUE, SAGITTAL, _bvec_array, _dcm2niix, _write_dwi, needs_dcm2niix,
)

from data_prep.diffusion import (  # noqa: E402
    Diffusion, _canon_comment_gradient, canon_series, diffusion_of, dwi_volumes, format_bval, fsl_bvecs,
    is_one_volume_dwi, vendor_of,
)
from data_prep.geometry import affine_ras, slice_normal  # noqa: E402

ORIENTATIONS = {"axial": AXIAL, "sagittal": SAGITTAL, "coronal": CORONAL, "oblique": OBLIQUE}
CANON = "CANON_MEC"
#: unit vectors exact to 3 decimals: dcm2niix writes a Canon comment's vector as it is (not renormalized)
EXACT_DIRS = [(0.48, 0.6, 0.64), (-0.36, 0.48, 0.8), (0.64, -0.6, 0.48), (0.8, 0.0, -0.6)]
#: one untagged b=0 image per slice, then four b=1000 directions (Canon/Toshiba tag only b > 0)
ENCODINGS = [(None, None, {})] + [(1000, g, {}) for g in EXACT_DIRS]


def _comment(g) -> str:
    return "b=1000(%.3f,%.3f,%.3f)" % tuple(g)


def _write(folder: Path, manufacturer: str, source: str, orientation, phase: str, encodings=ENCODINGS,
           b0=None):
    """A Toshiba/Canon series with gradient ``g`` of each b > 0 image in DiffusionGradientOrientation
    (``tag``), in ImageComments (``comment``, DiffusionBValue kept), or both (``both``: the comment holds
    another vector, ``g`` permuted, to show which one is read). ``b0``: how the b=0 images are tagged
    (None: untagged; ``"b"``: DiffusionBValue 0; ``"gradient"``: also DiffusionGradientOrientation 0\\0\\0;
    ``"comment"``: DiffusionBValue 0 and the comment ``b=0(0.000,0.000,0.000)``). Returns the datasets."""
    datasets = _write_dwi(folder, encodings, "toshiba", "standard", orientation, phase)
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        ds.Manufacturer = manufacturer
        if "DiffusionGradientOrientation" in ds:
            g = [float(x) for x in ds.DiffusionGradientOrientation]
            if source in ("comment", "both"):
                ds.ImageComments = _comment(g if source == "comment" else (g[1], g[2], g[0]))
            if source == "comment":
                del ds.DiffusionGradientOrientation
        elif b0 is not None and "DiffusionBValue" not in ds:
            ds.DiffusionBValue = 0.0
            if b0 == "gradient":
                ds.DiffusionGradientOrientation = [0.0, 0.0, 0.0]
            elif b0 == "comment":
                ds.ImageComments = "b=0(0.000,0.000,0.000)"
        ds.save_as(path)
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir())] if datasets else []


def _ours(datasets):
    """Our volumes and affine for a classic series: one reading for the whole series (canon_series),
    untagged images of a Canon/Toshiba series are its b=0 images (as data_prep.scan reads them)."""
    ori = [float(v) for v in datasets[0].ImageOrientationPatient]
    pos = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    keys = [int(ds.InstanceNumber) for ds in datasets]
    enc = [d or Diffusion(0.0, None) for d in canon_series([diffusion_of(ds) for ds in datasets], keys)]
    vols = dwi_volumes(pos @ slice_normal(ori), enc, keys)
    first = vols.volumes[0]
    spacing = [float(v) for v in datasets[0].PixelSpacing]
    return vols, affine_ras(pos[first[0]], pos[first[-1]], ori, spacing, len(first))


def _check(tmp_path, datasets):
    """bval text, bvec in dcm2niix's file frame (its grid is ours with rows bottom-up) and volume order."""
    vols, affine = _ours(datasets)
    ref = _dcm2niix(tmp_path / "in", tmp_path / "ref")
    assert format_bval(vols.bvalues) == ref["bval"]
    np.testing.assert_allclose(fsl_bvecs(vols.directions, affine @ FLIP_J, vols.bvalues),
                               _bvec_array(ref["bvec"]), atol=1e-4)
    data = np.asanyarray(ref["nii"].dataobj)  # pixel value 100 * volume + slice
    assert [int(data[0, 0, 0, v]) // 100 for v in range(len(vols.volumes))] == \
           [int(datasets[m[0]].pixel_array[0, 0]) // 100 for m in vols.volumes]
    return vols


CASES = [(source, plane, phase)
         for source in ("tag", "comment") for plane in ORIENTATIONS for phase in ("COL", "ROW")]
CASES += [("both", "oblique", "ROW"), ("both", "coronal", "COL")]


@needs_dcm2niix
@pytest.mark.parametrize("source,plane,phase", CASES, ids=["-".join(c) for c in CASES])
def test_canon_gradients_match_dcm2niix(tmp_path, source, plane, phase):
    datasets = _write(tmp_path / "in", CANON, source, ORIENTATIONS[plane], phase)
    vols = _check(tmp_path, datasets)
    assert list(vols.bvalues) == [0, 1000, 1000, 1000, 1000]


@needs_dcm2niix
@pytest.mark.parametrize("manufacturer,plane,phase", [("Canon Medical Systems", "oblique", "ROW"),
                                                      ("Canon Medical Systems", "sagittal", "COL"),
                                                      ("TOSHIBA_MEC", "oblique", "ROW"),
                                                      ("TOSHIBA_MEC", "coronal", "COL")])
def test_manufacturer_spellings_and_toshiba_lps(tmp_path, manufacturer, plane, phase):
    """Any Canon spelling reads the image frame; Toshiba's DiffusionGradientOrientation is LPS."""
    _check(tmp_path, _write(tmp_path / "in", manufacturer, "tag", ORIENTATIONS[plane], phase))


@needs_dcm2niix
@pytest.mark.parametrize("plane", ["coronal", "axial", "sagittal"])
def test_ge_row_phase_encoding_matches_dcm2niix(tmp_path, plane):
    """GE (and Canon) ROW phase encoding: dcm2niix swaps the axes after the plane's signs (dcm2niix
    PR #971), which differs from swapping first for coronal planes only."""
    datasets = _write_dwi(tmp_path / "in", base.BASE, "ge", "private", ORIENTATIONS[plane], "ROW")
    base._check_against_dcm2niix(tmp_path, datasets)


@needs_dcm2niix
def test_ge_short_gradients_scale_the_bvalue_like_dcm2niix(tmp_path):
    """A GE gradient of length 0.03-0.97 scales the b-value by its square, rounded to a multiple of 5
    (dcm2niix#163); 0.9706 is not scaled. Known difference: dcm2niix's .bvec then holds non-unit
    vectors, ours unit ones."""
    lengths2 = (0.223065, 0.5024, 0.0026, 0.942)
    axes = np.eye(3)[[0, 1, 2, 2]]
    encodings = [(0, None, {})] + [(1000, tuple(a * l2 ** 0.5), {}) for a, l2 in zip(axes, lengths2)]
    vols, affine = base._volumes_of(_write_dwi(tmp_path / "in", encodings, "ge", "private"))
    ref = _dcm2niix(tmp_path / "in", tmp_path / "ref")
    assert ref["bval"] == format_bval(vols.bvalues) == "0 225 500 5 1000\n"
    # dcm2niix writes these vectors unnormalized (divided by sqrt(b_written / b), e.g. 0.9957 and 0.9706):
    # same directions, unit length in ours
    theirs = _bvec_array(ref["bvec"])
    theirs[:, 1:] /= np.linalg.norm(theirs[:, 1:], axis=0)
    np.testing.assert_allclose(fsl_bvecs(vols.directions, affine @ FLIP_J, vols.bvalues), theirs, atol=1e-6)


CONVERT_CASES = [  # (source, b0 tagging, b=0 volume first, plane, phase)
    pytest.param("comment", None, True, "oblique", "ROW", id="comment-oblique-row"),
    pytest.param("comment", "comment", True, "coronal", "ROW", id="comment-b0-comment-coronal-row"),
    pytest.param("tag", None, True, "sagittal", "COL", id="tag-untagged-b0-sagittal"),
    pytest.param("tag", "gradient", True, "oblique", "ROW", id="tag-b0-zero-gradient"),
    pytest.param("tag", None, False, "coronal", "ROW", id="tag-dwi-first"),
]


@needs_dcm2niix
@pytest.mark.parametrize("source,b0,b0_first,plane,phase", CONVERT_CASES)
def test_canon_series_converts_like_dcm2niix(tmp_path, source, b0, b0_first, plane, phase):
    """End to end (header fast path, untagged b=0 images, written files): every dcm2niix volume is
    reproduced with its b-value and its gradient in world coordinates."""
    from helpers.paths import load_benchmark

    from data_prep.convert import convert_archive

    encodings = ENCODINGS if b0_first else ENCODINGS[1:] + ENCODINGS[:1]
    _write(tmp_path / "in", CANON, source, ORIENTATIONS[plane], phase, encodings, b0=b0)
    result = convert_archive(str(tmp_path / "in"), str(tmp_path / "out"), workers=1, progress=False)
    [row] = result.rows
    assert (row["kind"], row["shape"]) == ("dwi", "4x4x3x5"), [i.to_dict() for i in result.issues]
    stem = str(tmp_path / "out" / row["path"])[: -len(".nii.gz")]
    bvals = "0 1000 1000 1000 1000\n" if b0_first else "1000 1000 1000 1000 0\n"
    assert Path(stem + ".bval").read_text() == bvals
    comparison = load_benchmark("prep_vs_dcm2niix").compare(tmp_path / "in", tmp_path / "cmp", workers=1)
    assert (comparison.reference, comparison.reproduced) == (5, 5), comparison.missing


@needs_dcm2niix
@pytest.mark.parametrize("source", ["comment", pytest.param("tag")])
def test_one_volume_canon_series_converts_like_dcm2niix(tmp_path, source):
    """One Canon volume: ``dwi`` with dcm2niix's .bval/.bvec when it writes them (LPS reading), else an
    ``image`` (image-frame reading: dcm2niix writes none, as for GE)."""
    from helpers.paths import load_benchmark

    from data_prep.convert import convert_archive

    _write(tmp_path / "in", CANON, source, OBLIQUE, "ROW", [(1000, EXACT_DIRS[0], {})])
    [row] = convert_archive(str(tmp_path / "in"), str(tmp_path / "out"), workers=1, progress=False).rows
    assert row["kind"] == ("dwi" if source == "tag" else "image")
    comparison = load_benchmark("prep_vs_dcm2niix").compare(tmp_path / "in", tmp_path / "cmp", workers=1)
    assert (comparison.reference, comparison.reproduced) == (1, 1), comparison.missing


SERIES_CASES = {  # (source, b0 tagging, b=0 volume first): dcm2niix's reading of the whole series
    "untagged-b0-first": ("tag", None, True),            # image frame (the case above)
    "b0-tagged-b-only": ("tag", "b", True),               # image frame
    "b0-with-zero-gradient": ("tag", "gradient", True),   # LPS: the first image carries the tag
    "dwi-first": ("tag", None, False),                    # LPS
    "b0-gradient-then-comments": ("comment", "gradient", True),  # LPS, the comments' vectors too
    "b0-comment-then-comments": ("comment", "comment", True),    # image frame
}


@needs_dcm2niix
@pytest.mark.parametrize("case", list(SERIES_CASES))
def test_canon_series_read_by_its_first_image_like_dcm2niix(tmp_path, case):
    """dcm2niix picks one reading per series, by its first image: LPS if that image carries
    DiffusionGradientOrientation, else the image frame (GE's rules, with GE's b-value scaling: the
    b=500 volume stored as b=1000 with a gradient of length 0.707; dcm2niix rounds the product to a
    multiple of 5)."""
    source, b0, b0_first = SERIES_CASES[case]
    dwis = [(1000, g, {}) for g in EXACT_DIRS[:3]] + [(1000, (0.5, 0.5, 0.0), {})]  # |g|^2 = 0.5
    encodings = [(None, None, {})] + dwis if b0_first else dwis + [(None, None, {})]
    datasets = _write(tmp_path / "in", CANON, source, OBLIQUE, "ROW", encodings, b0=b0)
    vols = _check(tmp_path, datasets)
    lps = next(d for d in vols.diffusion if d.bvalue > 0).scanner is None
    assert lps == (b0 == "gradient" or not b0_first)
    assert vols.bvalues[0 if b0_first else -1] == 0
    assert sorted(set(vols.bvalues)) == ([0, 1000] if lps else [0, 500, 1000])


@needs_dcm2niix
@pytest.mark.parametrize("source", ["tag", "comment"])
def test_one_volume_canon_series_like_dcm2niix(tmp_path, source):
    """One volume: a ``.bval`` exactly when dcm2niix writes one (LPS reading: yes; image frame: never,
    as for GE)."""
    datasets = _write(tmp_path / "in", CANON, source, OBLIQUE, "ROW", [(1000, EXACT_DIRS[0], {})])
    ref = _dcm2niix(tmp_path / "in", tmp_path / "ref")
    keys = [int(ds.InstanceNumber) for ds in datasets]
    [one] = set(canon_series([diffusion_of(ds) for ds in datasets], keys))
    assert is_one_volume_dwi(one, CANON) == (ref["bval"] is not None) == (source == "tag")


def _write_uih(folder: Path, orientation, phase: str, encodings=None):
    """A UIH series: b-value in (0065,1009), gradient in (0065,1037) (image frame), no standard tags."""
    encodings = encodings or [(0, None, {})] + [(1000, g, {}) for g in EXACT_DIRS]
    _write_dwi(folder, encodings, "toshiba", "standard", orientation, phase)
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        ds.Manufacturer = "UIH"
        b = float(ds.get("DiffusionBValue", 0.0))
        g = [float(x) for x in ds.get("DiffusionGradientOrientation", [0.0, 0.0, 0.0])]
        for keyword in ("DiffusionBValue", "DiffusionGradientOrientation"):
            if keyword in ds:
                delattr(ds, keyword)
        block = ds.private_block(0x0065, "Image Private Header", create=True)
        block.add_new(0x09, "FD", b)
        block.add_new(0x37, "FD", g)
        ds.save_as(path)
    return [pydicom.dcmread(p) for p in sorted(folder.iterdir())]


@needs_dcm2niix
@pytest.mark.parametrize("plane,phase", [("axial", "COL"), ("oblique", "ROW"), ("sagittal", "COL"),
                                         ("coronal", "ROW")])
def test_uih_private_gradients_match_dcm2niix(tmp_path, plane, phase):
    """UIH (0065,1009)/(0065,1037): the gradient along the image's row, column and normal."""
    vols = _check(tmp_path, _write_uih(tmp_path / "in", ORIENTATIONS[plane], phase))
    assert list(vols.bvalues) == [0, 1000, 1000, 1000, 1000]


@needs_dcm2niix
def test_uih_series_converts_like_dcm2niix(tmp_path):
    from helpers.paths import load_benchmark

    _write_uih(tmp_path / "in", OBLIQUE, "ROW")
    comparison = load_benchmark("prep_vs_dcm2niix").compare(tmp_path / "in", tmp_path / "cmp", workers=1)
    assert (comparison.reference, comparison.reproduced) == (5, 5), comparison.missing


# --- header values (no dcm2niix) --------------------------------------------------------------------

class _Header(dict):
    def get(self, key, default=None):  # the ds.get(key) contract of diffusion_of
        return super().get(key, default)


def test_canon_comment_parsing():
    # the vector as stored (b-value scaling needs its length), first two components swapped
    assert _canon_comment_gradient("b=1500(0.445,0.000,0.895)") == (0.0, 0.445, 0.895)
    assert _canon_comment_gradient(b"b=1000( 0.6 , -0.8 , 0 )\x00") == pytest.approx((-0.8, 0.6, 0.0))
    for text in (None, "", "b=0(0.000,0.000,0.000)", "no gradient", "b=1000(0.6,0.8)", "b=1000(a,b,c)",
                 "(1,0,0)"):
        assert _canon_comment_gradient(text) is None, text


def test_canon_vendor_and_header_rules():
    spellings = ("CANON_MEC", "Canon Medical Systems", "TOSHIBA_MEC", "UIH", "United Imaging Healthcare")
    assert [vendor_of(m) for m in spellings] == ["canon", "canon", "other", "uih", "other"]
    axial_col = {"ImageOrientationPatient": [1, 0, 0, 0, 1, 0], "InPlanePhaseEncodingDirection": "COL"}
    # axial COL: dcm2niix's bvec is (-x, y, z) of the image-frame vector, i.e. LPS (-x, -y, z)
    tag = _Header(Manufacturer=CANON, DiffusionBValue=1000.0, DiffusionGradientOrientation=[0.6, 0.0, 0.8],
                  **axial_col)
    assert diffusion_of(tag).direction == pytest.approx((-0.6, 0.0, 0.8))
    # the comment swaps its first two components; DiffusionGradientOrientation wins over it
    comment = _Header(Manufacturer=CANON, DiffusionBValue=1000.0, ImageComments="b=1000(0.0,0.6,0.8)",
                      **axial_col)
    assert diffusion_of(comment).direction == pytest.approx((-0.6, 0.0, 0.8))
    both = _Header(comment, DiffusionGradientOrientation=[0, 0, 1])
    assert diffusion_of(both).direction == pytest.approx((0, 0, 1))
    # no DiffusionBValue: not a diffusion image (dcm2niix writes no .bval), whatever the comment says
    assert diffusion_of(_Header(Manufacturer=CANON, ImageComments="b=1000(0.0,0.6,0.8)", **axial_col)) is None
    # b=0: no gradient in the image frame (dcm2niix zeroes it, as for GE), kept as stored in LPS
    b0 = diffusion_of(_Header(comment, DiffusionBValue=0.0))
    assert (b0.bvalue, b0.direction, b0.scanner) == (0.0, None, Diffusion(0.0, (0.6, 0.0, 0.8)))
    # only DiffusionGradientOrientation on the first image makes the series LPS
    a, b = diffusion_of(comment), diffusion_of(_Header(tag, DiffusionGradientOrientation=[0, 0, 0]))
    assert not b0.gradient_tag and not a.gradient_tag and b.gradient_tag
    assert canon_series([a, b], [1, 2]) == [a, b] and canon_series([a, b], [2, 1]) == [a.scanner, b.scanner]
    assert canon_series([None, a], [1, 2]) == [None, a]
    # Toshiba reads no comment
    assert diffusion_of(_Header(comment, Manufacturer="TOSHIBA_MEC")) == Diffusion(1000.0, None)
