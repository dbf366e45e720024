"""Mutation testing of the math and the batch: which small changes to the code does no test notice?

    .venv/bin/pip install -e '.[mutation]'
    .venv/bin/python scripts/mutation.py            # mutate, test, write benchmarks/results/mutation.md
    .venv/bin/python scripts/mutation.py --report   # only rewrite the report from the last run's mutants/

What is mutated and which tests run is `[tool.mutmut]` in pyproject.toml: `onpolicy_kd/objectives/`,
`batch.py`, `rollout/engine.py` and `data/prompts.py`, against the fast in-process test files (each mutant runs
only the tests that call the function it changes). mutmut keeps its work in `mutants/` (git-ignored) and
reuses the verdicts of unchanged functions, so a second run after a fix tests only what changed. Not part of CI:
a full run takes about an hour on two cores. Run it alone on the machine (the timeouts are relative to the
tests' own times).

A surviving mutant needs a test that kills it, or an entry in EQUIVALENT saying why no test can: the run exits
1 while a survivor has neither.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "benchmarks" / "results" / "mutation.md"
MUTMUT = [sys.executable, "-m", "mutmut"]

# mutant name -> why it behaves exactly as the original (the reason a test cannot kill it).
EQUIVALENT: dict[str, str] = {
}


def results() -> dict[str, str]:
    """{mutant name: status} for every mutant of the last run (killed, survived, no tests, timeout, ...)."""
    out = subprocess.run([*MUTMUT, "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True, check=True)
    found = {}
    for line in out.stdout.splitlines():
        match = re.fullmatch(r"\s+(\S+): (.+)", line)
        if match:
            found[match.group(1)] = match.group(2).strip()
    return found


def module_of(mutant: str) -> str:
    """onpolicy_kd.objectives.pg.x_pg_returns__mutmut_12 -> onpolicy_kd/objectives/pg.py"""
    dotted = mutant.split("__mutmut_")[0].rsplit(".", 1)[0]
    return dotted.replace(".", "/") + ".py"


def diff_of(mutant: str) -> str:
    out = subprocess.run([*MUTMUT, "show", mutant], cwd=ROOT, capture_output=True, text=True)
    return "\n".join(line for line in out.stdout.splitlines()[1:] if line.startswith(("-", "+"))
                     and not line.startswith(("---", "+++")))


def write_report(statuses: dict[str, str], seconds: float | None, command: str) -> list[str]:
    by_file: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for mutant, status in statuses.items():
        by_file[module_of(mutant)][status] += 1
    columns = sorted({s for counts in by_file.values() for s in counts})
    survivors = sorted(m for m, s in statuses.items() if s == "survived")
    unexplained = [m for m in survivors if m not in EQUIVALENT]
    lines = [
        "# Mutation testing",
        "",
        f"Made by `{command}` (scripts/mutation.py; what is mutated and which tests run: `[tool.mutmut]` in "
        "pyproject.toml)" + (f", {seconds / 60:.0f} min on this machine." if seconds else "."),
        "",
        "| file | " + " | ".join(columns) + " | total |",
        "|---|" + "---|" * (len(columns) + 1),
    ]
    for path, counts in sorted(by_file.items()):
        lines.append(f"| {path} | " + " | ".join(str(counts[c]) for c in columns) + f" | {sum(counts.values())} |")
    total = collections.Counter(statuses.values())
    lines.append("| **all** | " + " | ".join(str(total[c]) for c in columns) + f" | {len(statuses)} |")
    lines += ["", f"Survivors: {len(survivors)}, of which equivalent to the original: {len(survivors) - len(unexplained)}, "
              f"not yet killed: {len(unexplained)}.", ""]
    if survivors:
        lines += ["## Survivors", ""]
        for mutant in survivors:
            why = EQUIVALENT.get(mutant, "**not killed: needs a test**")
            lines += [f"- `{mutant}`: {why}", "", "  ```diff"]
            lines += ["  " + line for line in diff_of(mutant).splitlines()]
            lines += ["  ```", ""]
    REPORT.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return unexplained


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", action="store_true", help="only rewrite the report from mutants/")
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("mutants", nargs="*", help="mutant names or globs to run (default: all)")
    args = parser.parse_args()
    seconds = None
    if not args.report:
        start = time.perf_counter()
        subprocess.run([*MUTMUT, "run", "--max-children", str(args.max_children), *args.mutants], cwd=ROOT, check=True)
        seconds = time.perf_counter() - start
    statuses = results()
    stale = sorted(set(EQUIVALENT) - set(statuses))
    if stale:
        print("EQUIVALENT names mutants that no longer exist (the code changed): " + ", ".join(stale))
    unexplained = write_report(statuses, seconds, "python scripts/mutation.py" + (" --report" if args.report else ""))
    print(f"{len(statuses)} mutants; report in {REPORT.relative_to(ROOT)}")
    for mutant in unexplained:
        print(f"survived: {mutant}")
    return 1 if unexplained or stale else 0


if __name__ == "__main__":
    sys.exit(main())
