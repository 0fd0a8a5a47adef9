"""Seconds to hash a stage folder of many small files (stage.artifact_hashes, run for every finished stage and
every reused one): the synthetic world's stage 00 writes one PNG per image (tiny: 27,329 files, the PNGs about 4.5 kB each).

    .venv/bin/python benchmarks/hashing.py                    # 3,000 and 27,000 files, 3 runs each
    .venv/bin/python benchmarks/hashing.py --files 30000 --repeats 5

Was a unit test's "< 3 s for 3,000 files" until 2026-12-08 (speed targets live here, not in tests).
Results: a Markdown table on stdout.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fgaif_utils import stage  # noqa: E402


def seconds_to_hash(n_files, size, repeats):
    with tempfile.TemporaryDirectory() as folder:
        for i in range(n_files):
            Path(folder, f"{i:05d}.png").write_bytes(os.urandom(size))
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            hashes = stage.artifact_hashes(folder)
            seconds.append(time.perf_counter() - start)
        assert len(hashes) == n_files
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, nargs="+", default=[3000, 27000])
    parser.add_argument("--size", type=int, default=4500, help="bytes per file")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("| files | bytes each | median s | min s | max s | files / s |")
    print("|---|---|---|---|---|---|")
    for n_files in args.files:
        seconds = seconds_to_hash(n_files, args.size, args.repeats)
        median = statistics.median(seconds)
        print(f"| {n_files:,} | {args.size} | {median:.3f} | {min(seconds):.3f} | {max(seconds):.3f} | "
              f"{n_files / median:,.0f} |")


if __name__ == "__main__":
    main()
