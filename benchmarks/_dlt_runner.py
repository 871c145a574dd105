"""The anchor: dlt's ``rest_api`` source over every resource, with the corrected
configuration of shared/reference/origin-spec.md, loading Parquet into a fresh DuckDB file.

Run by benchmarks/run.py with the interpreter of a venv of its own (``dlt[duckdb]``,
``pyarrow``; see ``DLT_REQUIREMENTS`` in run.py), never the project's: dlt's dependencies must
not leak into the project's measurements, nor the project's into dlt's. Like the job, it is
measured as a whole process, imports included, so the two walls compare like for like.

    MKT_API_KEY=... python _dlt_runner.py run --base-url URL --database PATH --pipelines-dir DIR
    python _dlt_runner.py count --database PATH

``run`` prints one line ``BENCH_JSON {...}`` with the pipeline's own seconds (imports and
start-up excluded: the harness times the whole process) and the rows dlt
says it normalized per table; ``count`` (run after the measured process, unmeasured) prints the
rows that really landed in the DuckDB file per table, so the harness can check them against
the simulator's account.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from typing import Any

# Set before dlt is imported: its configuration is read from the environment once.
# No telemetry (it would call out of the machine) and no progress bars on the log.
os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
os.environ.setdefault("RUNTIME__LOG_LEVEL", "WARNING")

DATASET = "marketing"
PAGE_SIZE = 100
# (name, path) of the paginated resources; contact_fields is one page and keyed by slug.
PAGINATED = (
    ("communities", "/community/communities"),
    ("contacts", "/contacts"),
    ("tags", "/tags"),
    ("course_resources", "/school/courses"),
    ("memberships", "/community/memberships"),
    ("enrollments", "/school/enrollments"),
)
TOP_LEVEL_TABLES = (*(name for name, _ in PAGINATED), "contact_fields")


def source_config(base_url: str, api_key: str) -> dict[str, Any]:
    """The origin spec's configuration with what dlt 1.31 really accepts: ``limit`` goes to
    the request's params (not the paginator), and the paginator finds the cursor at the last
    item's id and stops on ``hasMore`` (the spec's ``stop_condition`` is no dlt option, and
    without ``cursor_path`` dlt looks at ``cursors.next`` and stops after page one)."""
    paginator = {
        "type": "cursor",
        "cursor_path": "items[-1].id",
        "cursor_param": "startingAfter",
        "has_more_path": "hasMore",
    }
    resources: list[dict[str, Any]] = [
        {
            "name": name,
            "endpoint": {"path": path, "params": {"limit": PAGE_SIZE}, "data_selector": "items", "paginator": paginator},
        }
        for name, path in PAGINATED
    ]
    # contact_fields takes no parameters and has no id: one page, keyed by slug.
    resources.append(
        {
            "name": "contact_fields",
            "primary_key": "slug",
            "endpoint": {"path": "/contact_fields", "data_selector": "items", "paginator": {"type": "single_page"}},
        }
    )
    return {
        "client": {
            "base_url": base_url,
            "auth": {"type": "api_key", "name": "X-API-Key", "api_key": api_key, "location": "header"},
        },
        "resource_defaults": {"primary_key": "id", "write_disposition": "merge"},
        "resources": resources,
    }


def own_peak_kb() -> int:
    # ru_maxrss is the peak resident set in kB on Linux; the harness samples VmHWM as well.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run(base_url: str, database: str, pipelines_dir: str) -> dict[str, Any]:
    import dlt
    from dlt.sources.rest_api import rest_api_source

    started = time.perf_counter()
    # pipelines_dir in the run's own directory: no state from an earlier run is restored.
    pipeline = dlt.pipeline(
        pipeline_name="bench_marketing",
        pipelines_dir=pipelines_dir,
        destination=dlt.destinations.duckdb(database),
        dataset_name=DATASET,
    )
    source = rest_api_source(source_config(base_url, os.environ["MKT_API_KEY"]))
    info = pipeline.run(source, loader_file_format="parquet")
    seconds = time.perf_counter() - started
    info.raise_on_failed_jobs()
    trace = pipeline.last_trace
    normalized = dict(trace.last_normalize_info.row_counts) if trace and trace.last_normalize_info else {}
    return {
        # The harness's wall time covers the whole process; this is the pipeline alone.
        "pipeline_seconds": seconds,
        "steps": {step.step: (step.finished_at - step.started_at).total_seconds() for step in (trace.steps if trace else [])},
        "normalized_rows": {table: rows for table, rows in normalized.items() if not table.startswith("_dlt")},
        "peak_kb": own_peak_kb(),
    }


def count(database: str) -> dict[str, Any]:
    """Rows per table of the dataset, as DuckDB sees the file once dlt has gone."""
    import duckdb

    with duckdb.connect(database, read_only=True) as connection:
        tables = [
            name
            for (name,) in connection.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = ? ORDER BY 1", [DATASET]
            ).fetchall()
            if not name.startswith("_dlt")
        ]
        rows = {name: connection.execute(f'SELECT count(*) FROM "{DATASET}"."{name}"').fetchone()[0] for name in tables}
    return {"rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="load every resource into a fresh DuckDB file")
    run_parser.add_argument("--base-url", required=True)
    run_parser.add_argument("--database", required=True)
    run_parser.add_argument("--pipelines-dir", required=True, help="dlt's working directory for this run")
    count_parser = commands.add_parser("count", help="rows per table of a file a run wrote")
    count_parser.add_argument("--database", required=True)
    arguments = parser.parse_args()
    if arguments.command == "run":
        report = run(arguments.base_url, arguments.database, arguments.pipelines_dir)
    else:
        report = count(arguments.database)
    print("BENCH_JSON " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
