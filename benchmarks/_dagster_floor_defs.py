"""Dagster's own floor for a run shaped like ``marketing_sync``: the same assets and asset checks
in one multi-asset step under the in-process executor, each asset handed to an IO manager, each
check passing, and nothing fetched, staged or written. What this costs is what any project of
that shape pays Dagster per run (process start, instance, run creation and its planned events,
the step's events); the empty-account run minus this is the project's own fixed cost. Run as

    dagster job execute -f benchmarks/_dagster_floor_defs.py -j marketing_sync

with BENCH_FLOOR_SHAPE naming a JSON file ``{"assets": ["marketing/contacts", ...],
"checks": [["marketing/contacts", "primary_key_unique"], ...], "deps": {"marketing/contacts":
["marketing/tags", ...], ...}}`` (the benchmark writes it from the project's definitions; the
lineage is part of the shape: Dagster reads each upstream's latest materialization as it records
one) and BENCH_FLOOR_CHECKS=0 to leave the checks out.

The webhooks part runs it under the daemon for a refresh's shape, with more settings:
``"steps": {"<step>": {"assets": [...], "checks": [...]}}`` in the shape (a multi-asset per step,
as the refresh's run had them; without it, one step ``sync_marketing`` holds everything),
BENCH_FLOOR_JOB (the job's name, default ``marketing_sync``), BENCH_FLOOR_POOL (the steps' pool,
so the run queue weighs it as the project's) and BENCH_FLOOR_TRIGGER with
BENCH_FLOOR_SENSOR_SECONDS: a sensor, running by default, that every so many seconds reads the
integer in that file and launches one run when it grew, as the changes sensor reads its inbox.
"""

# No `from __future__ import annotations`: Dagster checks the context annotation as an object.
import graphlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import dagster as dg

SHAPE = json.loads(Path(os.environ["BENCH_FLOOR_SHAPE"]).read_text())
WITH_CHECKS = os.environ.get("BENCH_FLOOR_CHECKS", "1") != "0"
JOB = os.environ.get("BENCH_FLOOR_JOB", "marketing_sync")
POOL = os.environ.get("BENCH_FLOOR_POOL") or None
STEPS = SHAPE.get("steps") or {"sync_marketing": {"assets": SHAPE["assets"], "checks": SHAPE["checks"]}}


class MetadataOnlyIOManager(dg.IOManager):
    """Stores nothing; adds a row count, as the project's IO manager adds its metadata."""

    def handle_output(self, context: dg.OutputContext, obj: object) -> None:
        context.add_output_metadata({"dagster/row_count": 0})

    def load_input(self, context: dg.InputContext) -> object:
        return None


def floor_step(name: str, assets: list[str], checks: list[list[str]]) -> dg.AssetsDefinition:
    specs = [dg.AssetCheckSpec(check, asset=dg.AssetKey(asset.split("/"))) for asset, check in checks] if WITH_CHECKS else []
    deps = SHAPE.get("deps", {})
    # Yielded after what they depend on, as Dagster asks of one step's outputs.
    order = graphlib.TopologicalSorter({asset: [d for d in deps.get(asset, []) if d in assets] for asset in assets}).static_order()
    keys = [dg.AssetKey(asset.split("/")) for asset in order]
    # Each asset handed to the IO manager, as the project's are: a spec without an IO manager
    # key makes a Nothing output, which Dagster never hands to one (no HANDLED_OUTPUT event).
    asset_specs = [
        dg.AssetSpec(key, deps=[dg.AssetKey(parent.split("/")) for parent in deps.get(key.to_user_string(), [])])
        .with_io_manager_key("io_manager")
        for key in keys
    ]

    @dg.multi_asset(specs=asset_specs, check_specs=specs, can_subset=True, name=name, pool=POOL)
    def step(context: dg.AssetExecutionContext) -> Iterator[dg.Output[int] | dg.AssetCheckResult]:
        for key in keys:
            if key in context.selected_asset_keys:
                yield dg.Output(0, output_name=key.to_python_identifier(), metadata={"records_fetched": 0})
        for spec in specs:
            if spec.key in context.selected_asset_check_keys:
                yield dg.AssetCheckResult(asset_key=spec.asset_key, check_name=spec.name, passed=True)

    return step


def trigger_sensor(trigger: Path, seconds: int) -> dg.SensorDefinition:
    @dg.sensor(name="floor_changes", job_name=JOB, minimum_interval_seconds=seconds, default_status=dg.DefaultSensorStatus.RUNNING)
    def floor_changes(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        try:
            count = int(trigger.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            count = 0
        if count <= int(context.cursor or 0):
            return dg.SkipReason(f"no trigger after {context.cursor or 0}")
        return dg.SensorResult(run_requests=[dg.RunRequest(run_key=str(count))], cursor=str(count))

    return floor_changes


TRIGGER = os.environ.get("BENCH_FLOOR_TRIGGER")
defs = dg.Definitions(
    assets=[floor_step(name, step["assets"], step["checks"]) for name, step in STEPS.items()],
    # In process, as the project's jobs: one process for the whole run.
    jobs=[dg.define_asset_job(JOB, selection=dg.AssetSelection.all(), executor_def=dg.in_process_executor)],
    sensors=[trigger_sensor(Path(TRIGGER), int(os.environ.get("BENCH_FLOOR_SENSOR_SECONDS", "30")))] if TRIGGER else [],
    resources={"io_manager": MetadataOnlyIOManager()},
)
