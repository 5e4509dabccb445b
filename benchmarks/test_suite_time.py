"""How long ``make test`` takes: the whole test suite (slow tests included, what CI runs), timed.

Runs ``python -m pytest -q`` in the repository root with this interpreter (the venv ``make test`` installs; run
``make install`` first) and records the number of tests, the wall-clock time, and the CPU time of the test
processes (pytest and every process it started: DDP ranks, figure workers, CLI runs), with the machine's
``uptime`` load before and after: a wall time taken while other work shared the machine is not a user's time,
the CPU time is. Writes ``benchmarks/results/test_suite.md`` (``--out``) only when every test passed, so the
README's quoted time is that of a passing suite.

Run: ``.venv/bin/python benchmarks/test_suite_time.py [--out FILE] [-- PYTEST_ARGS]``.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import time

import _common as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: pytest's last line, e.g. ``934 passed, 284 warnings in 582.05s (0:09:42)`` or ``1 failed in 0.51s``.
SUMMARY = re.compile(r"\d+ (?:passed|failed|errors?)\b.* in (?P<seconds>[\d.]+)s\b")


def parse_summary(output: str) -> dict:
    """Tests passed, failed (failures and errors) and skipped, and pytest's own seconds, from its last line."""
    lines = [line for line in output.splitlines() if SUMMARY.search(line)]
    if not lines:
        raise ValueError("no pytest summary line ('N passed ... in S s') in the output")
    line = lines[-1]

    def count(word: str) -> int:
        found = re.search(rf"(\d+) {word}", line)
        return int(found.group(1)) if found else 0

    return {"passed": count("passed"), "failed": count("failed") + count("error"), "skipped": count("skipped"),
            "seconds": float(SUMMARY.search(line).group("seconds"))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=C.results_path("test_suite.md"), help="the results file (default %(default)s)")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args(argv)
    command = [sys.executable, "-m", "pytest", "-q", *args.pytest_args]  # what `make test` runs, install done
    load_before = C.uptime()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_after = C.uptime()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(proc.stdout[-2000:], end="")
    summary = parse_summary(proc.stdout)
    if proc.returncode != 0 or summary["failed"]:
        print(f"the suite failed (exit {proc.returncode}): nothing recorded", file=sys.stderr)
        return 1
    text = (
        f"`{' '.join(['python', *command[1:]])}` in the repository root, {os.cpu_count()} cores.\n\n"
        + C.table(["tests passed", "skipped", "wall-clock", "CPU time of the test processes", "CPU / wall"],
                  [[summary["passed"], summary["skipped"], f"{wall / 60:.1f} min", f"{cpu / 60:.1f} min",
                    f"{cpu / wall:.2f}"]])
        + f"\n\nLoad before: `{load_before}`; after: `{load_after}`.\n"
    )
    C.write_results(args.out, "test_suite_time.py", argv, "make test: the whole suite, timed", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
