"""`medimb-prep locate ARCHIVE TOKEN...`: which archive files a report's ``~xxxxxxxx`` tokens stand for.

report.json never shows a folder or file name that might identify a patient; it shows ``[folder]~3fa9c01b``
(8 hex digits of HMAC(key, original name)). With the same key, this command walks the archive (names only,
no file is opened) and prints the archive-relative paths whose components carry those tokens. Its output
holds the archive's real names: it is for your terminal, not for sharing.
"""

from __future__ import annotations

import os
from pathlib import Path

from data_prep import deid


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("locate", help="find the archive files behind report.json's ~tokens",
                              description=__doc__)
    p.add_argument("archive", help="the archive folder that was converted")
    p.add_argument("tokens", nargs="+", help="tokens as report.json shows them, e.g. '[folder]~3fa9c01b' or 3fa9c01b")
    deid.add_key_arguments(p)
    p.set_defaults(func=run)


def locate(archive: str, tokens: list[str], key: str) -> list[str]:
    """Archive-relative paths (sorted) with a component whose keyed hash is one of ``tokens``."""
    wanted = {t.rsplit("~", 1)[-1].lower() for t in tokens}
    found = set()
    for dirpath, dirnames, filenames in os.walk(archive):
        rel_dir = os.path.relpath(dirpath, archive)
        parts_dir = [] if rel_dir == "." else rel_dir.split(os.sep)
        if any(deid.keyed_hash(p, key, 8) in wanted for p in parts_dir):
            found.update(os.path.join(rel_dir, f) for f in filenames)
        found.update(os.path.join(rel_dir, f) if parts_dir else f
                     for f in filenames if deid.keyed_hash(f, key, 8) in wanted)
    return sorted(found)


def run(args) -> int:
    from data_prep.cli import UserError

    if not Path(args.archive).is_dir():
        raise UserError(f"archive folder not found: {args.archive}")
    paths = locate(args.archive, args.tokens, deid.key_from_arguments(args))
    for path in paths:
        print(path)
    if not paths:
        print("no file matches (same archive and the same de-identification key as the conversion?)")
    return 0 if paths else 1
