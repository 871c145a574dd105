"""Dagster's own floor for a run shaped like ``marketing_sync``: the same assets and asset checks
in one multi-asset step under the in-process executor, each asset handed to an IO manager, each
check passing, and nothing fetched, staged or written. What this costs is what any project of
that shape pays Dagster per run (process start, instance, run creation and its planned events,
the step's events); the empty-account run minus this is the project's own fixed cost. Run as

    dagster job execute -f benchmarks/_dagster_floor_defs.py -j marketing_sync

with BENCH_FLOOR_SHAPE naming a JSON file ``{"assets": ["marketing/contacts", ...],
"checks": [["marketing/contacts", "primary_key_unique"], ...]}`` (the benchmark writes it from
the project's definitions) and BENCH_FLOOR_CHECKS=0 to leave the checks out.
"""

# No `from __future__ import annotations`: Dagster checks the context annotation as an object.
import json
import os
from collections.abc import Iterator
from pathlib import Path

import dagster as dg

SHAPE = json.loads(Path(os.environ["BENCH_FLOOR_SHAPE"]).read_text())
ASSET_KEYS = [dg.AssetKey(key.split("/")) for key in SHAPE["assets"]]
CHECKS = (
    [dg.AssetCheckSpec(name, asset=dg.AssetKey(asset.split("/"))) for asset, name in SHAPE["checks"]]
    if os.environ.get("BENCH_FLOOR_CHECKS", "1") != "0"
    else []
)


class MetadataOnlyIOManager(dg.IOManager):
    """Stores nothing; adds a row count, as the project's IO manager adds its metadata."""

    def handle_output(self, context: dg.OutputContext, obj: object) -> None:
        context.add_output_metadata({"dagster/row_count": 0})

    def load_input(self, context: dg.InputContext) -> object:
        return None


@dg.multi_asset(specs=[dg.AssetSpec(key) for key in ASSET_KEYS], check_specs=CHECKS, can_subset=True, name="sync_marketing")
def sync_marketing(context: dg.AssetExecutionContext) -> Iterator[dg.Output[None] | dg.AssetCheckResult]:
    for key in ASSET_KEYS:
        if key in context.selected_asset_keys:
            yield dg.Output(None, output_name=key.to_python_identifier(), metadata={"records_fetched": 0})
    for spec in CHECKS:
        if spec.key in context.selected_asset_check_keys:
            yield dg.AssetCheckResult(asset_key=spec.asset_key, check_name=spec.name, passed=True)


defs = dg.Definitions(
    assets=[sync_marketing],
    # In process, as the project's jobs: one process for the whole run.
    jobs=[dg.define_asset_job("marketing_sync", selection=dg.AssetSelection.all(), executor_def=dg.in_process_executor)],
    resources={"io_manager": MetadataOnlyIOManager()},
)
