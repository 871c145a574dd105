"""Compare this checkout with a base revision in one sitting, runs alternating, for the
"no benchmark figure gets worse" check of an issue.

    python benchmarks/compare.py --base 149adb8 --contacts 100000 --repeat 8

On a shared two-core machine consecutive runs of one build spread by a third (a noisy spell
lasts a minute or two), so a block of base runs followed by a block of new runs can show a
difference that is only the spell. Here each repeat runs both builds back to back, in the order
AB then BA then AB..., so drift hits both alike, and the table gives each side's median and the
median of the per-repeat ratios (new / base) with how many repeats the new build won.

The base revision is checked out with ``git worktree`` into the work directory and put first on
``PYTHONPATH``, so ``-m mkt_assets.definitions`` and every helper process import its code; the
interpreter and the installed dependencies are this checkout's.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import ChildFailed, Simulator, describe_machine
from run import (
    INCREMENTAL_JOB,
    Bench,
    compile_bytecode,
    make_bench,
    progress,
    project_package,
    remove_database,
    run_job,
    timeout_for,
)

REPO = Path(__file__).resolve().parent.parent

Measure = Callable[[Bench, Simulator, dict[str, str]], dict[str, float]]


def checkout(base: str, root: Path) -> Path:
    path = root / "base"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), base], check=True, capture_output=True)
    return path


def remove_checkout(path: Path) -> None:
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=False, capture_output=True)


def measure_empty(bench: Bench, sim: Simulator, env: dict[str, str]) -> dict[str, float]:
    run = run_job(bench, sim, timeout_for(0, 0.05), name="fixed", extra_env=env)
    return {"N1a marketing_sync, empty account": run["seconds"], "  its CPU, every process (N1a)": run["cpu_seconds"]}


def measure_full(bench: Bench, sim: Simulator, env: dict[str, str]) -> dict[str, float]:
    run_dir = bench.run_dir("pair")
    database = run_dir / "sync.duckdb"
    size = f"{sim.contacts // 1000}k"
    try:
        full = run_job(bench, sim, timeout_for(sim.contacts, 0.05), database=database, extra_env=env)
        incremental = run_job(
            bench, sim, timeout_for(sim.contacts, 0.05), name="incremental", job=INCREMENTAL_JOB, database=database, extra_env=env
        )
    finally:
        remove_database(database)
    return {
        f"marketing_sync, {size}": full["seconds"],
        f"  its CPU, every process ({size} sync)": full["cpu_seconds"],
        f"N1b marketing_incremental, {size}, nothing new": incremental["seconds"],
        f"  its CPU, every process ({size} incremental)": incremental["cpu_seconds"],
    }


def alternate(
    bench: Bench, sim: Simulator, measure: Measure, base_env: dict[str, str], repeat: int
) -> dict[str, dict[str, list[float]]]:
    """``measure`` ``repeat`` times for each build, the order alternating per repeat; only
    repeats where both builds succeeded count."""
    results: dict[str, dict[str, list[float]]] = {"base": {}, "new": {}}
    for index in range(repeat):
        order = ("base", "new") if index % 2 == 0 else ("new", "base")
        pair: dict[str, dict[str, float]] = {}
        for build in order:
            try:
                pair[build] = measure(bench, sim, base_env if build == "base" else {})
            except ChildFailed as failure:
                progress(f"{build} {index + 1}/{repeat} failed: {str(failure)[:300]}")
                break
            progress(f"{build} {index + 1}/{repeat}: " + ", ".join(f"{k.strip()} {v:.2f}" for k, v in pair[build].items()))
        if len(pair) == 2:
            for build, figures in pair.items():
                for name, value in figures.items():
                    results[build].setdefault(name, []).append(value)
    return results


def table_rows(results: dict[str, dict[str, list[float]]]) -> list[str]:
    rows = []
    for name, base in results["base"].items():
        new = results["new"][name]
        ratios = [n / b for n, b in zip(new, base, strict=True) if b > 0]
        wins = sum(n <= b for n, b in zip(new, base, strict=True))
        rows.append(
            f"| {name:<48} | {statistics.median(base):7.2f} [{min(base):.1f}-{max(base):.1f}] "
            f"| {statistics.median(new):7.2f} [{min(new):.1f}-{max(new):.1f}] "
            f"| {statistics.median(ratios):5.3f} [{min(ratios):.2f}-{max(ratios):.2f}] | {wins}/{len(new)} |"
        )
    return rows


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the revision to compare with (a commit, tag or branch)")
    parser.add_argument("--contacts", type=int, default=100_000, help="the account's size for the full and incremental runs")
    parser.add_argument("--repeat", type=int, default=8, help="repeats per build (both builds run in each)")
    parser.add_argument("--parts", nargs="+", choices=("fixed", "full"), default=["fixed", "full"])
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    root = Path(tempfile.mkdtemp(prefix="mkt_compare_"))
    progress(f"work directory {root}")
    base = checkout(arguments.base, root)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
    bench = make_bench(root, pace_requests=True)
    compile_bytecode(project_package(), base / "mkt_assets")  # both builds load bytecode, as installed packages do
    base_env = {"PYTHONPATH": str(base)}
    results: dict[str, dict[str, list[float]]] = {"base": {}, "new": {}}
    try:
        for part, contacts, measure in (("fixed", 0, measure_empty), ("full", arguments.contacts, measure_full)):
            if part not in arguments.parts:
                continue
            with bench.start_simulator(contacts) as sim:
                for build, figures in alternate(bench, sim, measure, base_env, arguments.repeat).items():
                    results[build].update(figures)
    finally:
        remove_checkout(base)
    print("\n".join(describe_machine().lines()))
    print(f"base {arguments.base}, new {head}{' with uncommitted changes' if dirty else ''}; {arguments.repeat} repeats, alternating")
    print()
    print(f"| {'measure (seconds)':<48} | base median [min-max] | new median [min-max] | new/base, median per repeat [min-max] | new <= base |")
    print(f"|{'-' * 50}|-----------------------|----------------------|---------------------------------------|-------------|")
    for row in table_rows(results):
        print(row)
    shutil.rmtree(root, ignore_errors=True)
    return 0 if results["new"] else 1


if __name__ == "__main__":
    sys.exit(main())
