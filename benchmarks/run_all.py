"""Run every benchmark script in ``benchmarks/`` in turn (each in a fresh process) and collect their tables.

Each ``benchmarks/*.py`` with a ``main()`` (every file not starting with ``_`` other than this one, e.g.
``hvp_cost.py``, ``eigensolvers.py``, ``monitor_overhead.py``, ``quasi_newton_training.py`` when present) is run
as ``python benchmarks/<name>.py [options]``; the markdown each prints goes to stdout and, with ``--out FILE``,
to that file too. ``--quick`` and ``--threads N`` are passed on to every script that declares that option. A failing script
is reported and the others still run; the exit status is non-zero if any failed.

Run: ``python benchmarks/run_all.py [--quick] [--threads 2] [--out results.md] [--only hvp_cost,...]``.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
#: Scripts in a sensible order (cheap first); any other benchmark script found is run after them.
PREFERRED_ORDER = ["hvp_cost", "eigensolvers", "monitor_overhead", "quasi_newton_training"]
#: Scripts that are not benchmarks of the package: ``test_suite_time`` times ``make test`` (the whole test suite).
NOT_BENCHMARKS = {"test_suite_time"}


def scripts(only: list[str] | None = None) -> list[str]:
    """The benchmark scripts to run, in order."""
    found = {
        os.path.splitext(os.path.basename(p))[0]
        for p in glob.glob(os.path.join(HERE, "*.py"))
        if not os.path.basename(p).startswith("_") and os.path.basename(p) != os.path.basename(__file__)
    }
    found -= NOT_BENCHMARKS
    ordered = [n for n in PREFERRED_ORDER if n in found] + sorted(found - set(PREFERRED_ORDER))
    if only:
        unknown = sorted(set(only) - found)
        if unknown:
            raise SystemExit(f"--only names unknown scripts {unknown}; available: {ordered}")
        ordered = [n for n in ordered if n in only]
    return ordered


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    parser.add_argument("--threads", type=int, default=None, help="pass --threads N to every script")
    parser.add_argument("--out", default=None, help="also write the collected markdown to this file")
    parser.add_argument("--only", default=None, help="comma-separated script names (without .py)")
    args = parser.parse_args(argv)
    wanted = {"--quick": ["--quick"] if args.quick else [], "--threads": [f"--threads={args.threads}"] if args.threads else []}
    env = dict(os.environ)
    root = os.path.dirname(HERE)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    outputs, failed = [], []
    for name in scripts(args.only.split(",") if args.only else None):
        path = os.path.join(HERE, f"{name}.py")
        with open(path, encoding="utf-8") as fh:
            source = fh.read()
        # Pass an option only to scripts that declare it (a script without --quick runs at its own size).
        # Scripts built on _common.parse_args declare --quick/--threads there rather than in their own source.
        common = "C.parse_args(" in source
        passed = [a for opt, given in wanted.items() if common or f'"{opt}"' in source for a in given]
        cmd = [sys.executable, path, *passed]
        print(f"# running {name}.py {' '.join(passed)}".rstrip(), file=sys.stderr, flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - start
        print(proc.stdout, flush=True)
        if proc.returncode != 0:
            failed.append(name)
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            print(f"**{name}.py failed (exit {proc.returncode}) after {seconds:.0f} s:**\n```\n{tail}\n```\n", flush=True)
        else:
            print(f"_{name}.py: {seconds:.0f} s_\n", flush=True)
        outputs.append(proc.stdout)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write("\n".join(outputs))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
