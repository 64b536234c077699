"""Fuzzed archives through ``medimb-prep convert`` (issue 11): benchmarks/fuzz_prep.py's oracle must hold.

Two groups, each run a ``python -m data_prep convert`` subprocess under a time and memory limit:

* ``test_mutation_class[NAME]``: the fixed regression case of every named mutation class
  (SeriesNumber 'abc', NaN geometry, NumberOfFrames 1e9, read-only OUT, ...) on its regression
  source;
* ``test_seeded_selection[...]``: a seeded random selection of runs drawn exactly as
  ``benchmarks/fuzz_prep.py --mutations N --seed S`` draws them (classes, sources, several files,
  several mutations in one archive).

A failure lists every violated oracle rule. Reproduce one with
``python benchmarks/fuzz_prep.py --case NAME --keep DIR`` or ``--replay SEED:INDEX --keep DIR``
(DIR then holds the archive, OUT and the convert's stdout/stderr). Cases on the real Siemens
series skip when ``../shared/data`` is absent; the pydicom-data cases always run.
"""

from __future__ import annotations


import pytest
from helpers.paths import load_benchmark


fuzz = load_benchmark("fuzz_prep")

#: a fixed data_prep needs well under 1 GiB for these small archives; a blow-up then fails fast
LIMITS = fuzz.Limits(timeout_s=60, memory_bytes=1 << 30)
SELECTION_SEED = 2026
SELECTION_RUNS = 48


def _marks(source: str) -> list:
    return [pytest.mark.real_data] if source == fuzz.SIEMENS else []


def _class_params() -> list:
    return [pytest.param(name, marks=_marks(m.regression_source), id=name)
            for name, m in fuzz.MUTATIONS.items()]


def _selection_params() -> list:
    return [pytest.param(spec, marks=_marks(spec.source), id=f"{spec.index:02d}-{spec.label}")
            for spec in fuzz.plan_runs(SELECTION_RUNS, SELECTION_SEED)]


def _assert_oracle_holds(result) -> None:
    """Fail with one line per violated rule (not the run's whole stdout/stderr)."""
    if result.violations:
        pytest.fail(fuzz.format_violations(result), pytrace=False)


@pytest.mark.parametrize("name", _class_params())
def test_each_mutation_class_regression_case_holds_the_oracle(name, tmp_path):
    spec = fuzz.regression_case(name)
    if spec is None:
        pytest.skip(f"regression source {fuzz.MUTATIONS[name].regression_source} absent (no shared data)")
    _assert_oracle_holds(fuzz.execute(spec, LIMITS, workdir=tmp_path))


@pytest.mark.parametrize("spec", _selection_params())
def test_seeded_fuzz_cases_hold_the_oracle(spec, tmp_path):
    _assert_oracle_holds(fuzz.execute(spec, LIMITS, workdir=tmp_path))


def test_oracle_catches_a_broken_volume(tmp_path):
    """The NIfTI validator itself: a NaN voxel, a skewed affine and a 1e-5 mm voxel are all reported."""
    import numpy as np
    from helpers.nifti import write_nifti

    good = np.eye(4)
    data = np.ones((2, 3, 4), np.float32)
    write_nifti(tmp_path / "good.nii.gz", data, good)
    assert fuzz.validate_nifti(tmp_path / "good.nii.gz") == []
    bad = data.copy()
    bad[0, 0, 0] = np.nan
    skewed = good.copy()
    skewed[:3, 1] = [0.3, 0.95, 0]
    flat = np.diag([1.0, 1e-5, 1.0, 1.0])
    cases = [("nan", bad, good, "not finite"), ("skew", data, skewed, "orthonormal"),
             ("flat", data, flat, "outside")]
    for name, arr, affine, expected in cases:
        write_nifti(tmp_path / f"{name}.nii.gz", arr, affine)
        problems = fuzz.validate_nifti(tmp_path / f"{name}.nii.gz")
        assert any(expected in p for p in problems), (name, problems)
