"""benchmarks/bench_imbalance.py's code paths of issue 14: stage 2 re-run from a cached stage 1
(``--stage2-from``), variants filed under ``--tag``, the interval and paired-difference table."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from helpers.paths import load_benchmark
from helpers.training import TINY_NETWORK, tiny_npz



@pytest.fixture(scope="module")
def bench():
    """benchmarks/bench_imbalance.py as a module (benchmarks/ is not a package)."""
    return load_benchmark("bench_imbalance")


def test_t_interval_of_three_seeds(bench):
    lo, hi = bench.t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.303
    assert lo == pytest.approx(2 - 4.3027 / math.sqrt(3), abs=1e-3)
    assert hi == pytest.approx(2 + 4.3027 / math.sqrt(3), abs=1e-3)
    assert all(math.isnan(v) for v in bench.t_interval([0.5]))


def test_stage2_from_reproduces_the_full_run_and_files_variants(bench, tmp_path, capsys):
    """cRT re-run on the copied stage-1 model with the same seed ends exactly where the full two-stage run
    did (so stage-2 variants are compared on one representation); an LWS variant sits beside it."""
    tiny_npz(tmp_path / "tiny.npz")
    out = tmp_path / "runs"
    common = ["--data-dir", str(tmp_path), "--datasets", "tiny", "--seeds", "0", "--epochs", "2",
              "--stage2-epochs", "1", "--network-kwargs", json.dumps(TINY_NETWORK), "--device", "cpu",
              "--out", str(out), "--no-progress"]
    bench.main([*common, "--methods", "ce", "two-stage"])
    bench.main([*common, "--methods", "two-stage", "--stage2-from", "two-stage", "--tag", "again"])
    bench.main([*common, "--methods", "two-stage", "--stage2-from", "two-stage", "--tag", "lws",
                "--set", "stage2.rebalance=lws"])
    full = json.loads((out / "tiny/two-stage/seed0.json").read_text())
    again = json.loads((out / "tiny/two-stage@again/seed0.json").read_text())
    lws = json.loads((out / "tiny/two-stage@lws/seed0.json").read_text())
    assert again["val"] == full["val"] and again["test"] == full["test"]
    assert again["stage2_from"] == "two-stage" and lws["overrides"] == {"stage2.rebalance": "lws"}
    config = json.loads((out / "tiny/two-stage@lws/seed0/config.json").read_text())
    assert config["method"]["stage2"]["rebalance"] == "lws"
    assert full["cpu_seconds"] > 0 and "stage1" in full["epoch_seconds"]
    capsys.readouterr()
    bench.main(["--table-only", "--datasets", "tiny", "--out", str(out)])
    text = capsys.readouterr().out
    assert "| two-stage@lws | 1 | 2+1 (s2 only, s1 of two-stage) |" in text
    assert "Paired against `ce`" in text and "| two-stage@again | 1 |" in text
    shutil.copytree(out / "tiny", out / "tiny_copy")  # a second dataset: the recipe choice across both
    bench.main(["--table-only", "--datasets", "tiny", "tiny_copy", "--out", str(out)])
    text = capsys.readouterr().out
    assert "Recipe choice across tiny, tiny_copy" in text and "Validation picks **" in text
    # the same --tag with other overrides would mix settings in one row: refused
    with pytest.raises(SystemExit, match="other|not"):
        bench.main([*common, "--methods", "two-stage", "--stage2-from", "two-stage", "--tag", "lws",
                    "--set", "stage2.rebalance=tau_norm"])
