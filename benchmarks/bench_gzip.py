"""Benchmark: the gzip compressors medimb-prep can use, on the raw voxels of a converted folder.

    .venv/bin/python benchmarks/bench_gzip.py OUT_OF_MEDIMB_PREP_CONVERT [--repeats 3]

Decompresses every ``.nii.gz`` under the folder once (untimed), then compresses each file's bytes
with zlib level 1 (``Z_RLE``, the fallback), zlib level 1 (default strategy), zlib level 6 and ISA-L
levels 0-2 (python-isal; medimb-prep uses level 1), one gzip member per file, in this one process.
Prints seconds (best of ``--repeats``) and the total compressed size, as a Markdown table.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import time
import zlib
from pathlib import Path


def compressors() -> dict:
    out = {
        "zlib 1, Z_RLE (fallback)": lambda: zlib.compressobj(1, zlib.DEFLATED, 31, 8, zlib.Z_RLE),
        "zlib 1": lambda: zlib.compressobj(1, zlib.DEFLATED, 31),
        "zlib 6 (gzip default)": lambda: zlib.compressobj(6, zlib.DEFLATED, 31),
    }
    try:
        from isal import isal_zlib
    except ImportError:
        return out
    for level in (0, 1, 2):
        name = f"ISA-L {level}" + (" (medimb-prep)" if level == 1 else "")
        out[name] = lambda level=level: isal_zlib.compressobj(level, isal_zlib.DEFLATED, 31)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    raw = [gzip.decompress(p.read_bytes()) for p in sorted(Path(args.folder).rglob("*.nii.gz"))]
    print(f"{len(raw)} files, {sum(map(len, raw)) / 1e6:.1f} MB uncompressed")
    print("| compressor | seconds (best of %d) | MB written |" % args.repeats)
    print("|---|---:|---:|")
    for name, make in compressors().items():
        best, size = float("inf"), 0
        for _ in range(args.repeats):
            t0, size = time.perf_counter(), 0
            for data in raw:
                c = make()
                size += len(c.compress(data)) + len(c.flush())
            best = min(best, time.perf_counter() - t0)
        print(f"| {name} | {best:.2f} | {size / 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
