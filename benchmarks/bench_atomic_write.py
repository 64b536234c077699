"""Cost of one small atomic file write (``data_prep.io.write_text_atomic``), as conversion writes
thousands of them (sidecars, resume markers).

    .venv/bin/python benchmarks/bench_atomic_write.py [--files 2000] [--dir /tmp]

Writes ``--files`` new 3-byte files (new names: replacing an existing file costs more on ext4) and prints
microseconds per file next to a plain ``os.open`` + ``os.write`` + ``os.close`` of the same files.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from data_prep.io import write_text_atomic


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--dir", default="/tmp")
    args = ap.parse_args(argv)
    folder = tempfile.mkdtemp(dir=args.dir)
    start = time.perf_counter()
    for i in range(args.files):
        write_text_atomic(os.path.join(folder, f"a{i}.json"), "{}\n")
    atomic = (time.perf_counter() - start) / args.files * 1e6
    start = time.perf_counter()
    for i in range(args.files):
        fd = os.open(os.path.join(folder, f"p{i}.json"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        os.write(fd, b"{}\n")
        os.close(fd)
    plain = (time.perf_counter() - start) / args.files * 1e6
    print(f"write_text_atomic: {atomic:.0f} us a file; plain create + write: {plain:.0f} us a file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
