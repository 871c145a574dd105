"""Materialize one marketing asset in this process, alone, and report its timings.

Run by benchmarks/run.py in a fresh process per materialization, so the peak resident set it
reports is this asset's own (the simulator runs elsewhere). Imports and definitions are built
before the clock starts: their cost is part of Dagster's fixed cost, measured separately.

Usage: MKT_API_KEY=... python benchmarks/_asset_runner.py --base-url URL --database PATH [--asset contacts]
Prints one line ``BENCH_JSON {...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import time
from typing import Any

import dagster as dg

from mkt_assets.core.catalog import RESOURCES_BY_NAME
from mkt_assets.orchestration.assets import DEFAULT_NAMES, build_marketing_assets
from mkt_assets.orchestration.io_manager import MarketingDuckDBIOManager
from mkt_assets.orchestration.resource import MarketingApiResource, WarehouseResource
from mkt_assets.orchestration.settings import Settings


def own_peak_kb() -> int:
    """VmHWM: the kernel's high-water mark of this process's resident set."""
    with open("/proc/self/status") as status:
        match = re.search(r"^VmHWM:\s+(\d+) kB", status.read(), re.MULTILINE)
    return int(match.group(1)) if match else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def metadata_value(metadata: dict[str, Any], key: str) -> Any:
    entry = metadata.get(key)
    return getattr(entry, "value", entry)


def step_seconds(instance: dg.DagsterInstance, run_id: str) -> float | None:
    """From STEP_START to STEP_SUCCESS in the event log: fetch, stage, merge and the checks."""
    moments: dict[str, float] = {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is not None and event.event_type_value in ("STEP_START", "STEP_SUCCESS"):
            moments[event.event_type_value] = entry.timestamp
    if "STEP_START" in moments and "STEP_SUCCESS" in moments:
        return moments["STEP_SUCCESS"] - moments["STEP_START"]
    return None


def run(asset_name: str, base_url: str, database: str, pace_requests: bool, history: bool = True) -> dict[str, Any]:
    assets = build_marketing_assets(Settings(history=history))
    key = DEFAULT_NAMES.asset_key(asset_name)
    resources = {
        # The same settings the job's definitions use, except the URL and key.
        "marketing_api": MarketingApiResource(
            base_url=base_url, api_key=os.environ["MKT_API_KEY"], pace_requests=pace_requests
        ),
        "duckdb_io_manager": MarketingDuckDBIOManager(warehouse=WarehouseResource(database=database)),
        "warehouse": WarehouseResource(database=database),
    }
    instance = dg.DagsterInstance.ephemeral()
    started = time.perf_counter()
    # The asset alone, as "Materialize" on it in the UI (the normalized tables that read it
    # are rebuilt with it, in the same transaction).
    result = dg.materialize([assets], selection=[key], resources=resources, instance=instance)
    seconds = time.perf_counter() - started
    (event,) = [event for event in result.get_asset_materialization_events() if event.asset_key == key]
    metadata = dict(event.materialization.metadata)
    return {
        "seconds": seconds,
        "step_seconds": step_seconds(instance, result.run_id),
        "fetch_seconds": metadata_value(metadata, "fetch_seconds"),
        "merge_seconds": metadata_value(metadata, "merge_seconds"),
        "pages": metadata_value(metadata, "pages"),
        "requests": metadata_value(metadata, "requests"),
        "records": metadata_value(metadata, "records_fetched"),
        "rows_inserted": metadata_value(metadata, "rows_inserted"),
        "rows_updated": metadata_value(metadata, "rows_updated"),
        "rows_unchanged": metadata_value(metadata, "rows_unchanged"),
        "row_count": metadata_value(metadata, "dagster/row_count"),
        "versions_opened": metadata_value(metadata, "versions_opened"),
        "peak_kb": own_peak_kb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--database", required=True)
    parser.add_argument("--asset", default="contacts", choices=sorted(RESOURCES_BY_NAME))
    parser.add_argument("--no-pace", action="store_true", help="pace_requests=False on the resource")
    parser.add_argument("--no-history", action="store_true", help="keep no history (MKT_HISTORY=off)")
    arguments = parser.parse_args()
    report = run(arguments.asset, arguments.base_url, arguments.database, not arguments.no_pace, not arguments.no_history)
    print("BENCH_JSON " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
