"""dagster-dlt's ``@dlt_assets`` over the same dlt configuration as _dlt_runner.py: what the
project would be if it were dlt inside Dagster. An optional context row of the benchmark
(``--parts dagster-dlt``), run as

    dagster job execute -f benchmarks/_dagster_dlt_defs.py -j dlt_sync

by the python of a venv of its own (dlt, pyarrow, dagster, dagster-dlt; see _dlt_env.py), with
MKT_API_BASE_URL, MKT_API_KEY, BENCH_DLT_DATABASE and BENCH_DLT_PIPELINES_DIR set. One
multi-asset step under the in-process executor: the layout the project's job is moving to.
"""

# No `from __future__ import annotations`: Dagster checks the context annotation as an object.
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Before dlt is imported, as in _dlt_runner.py: no telemetry, which would call out.
os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dagster as dg
import dlt
from _dlt_runner import DATASET, source_config
from dagster_dlt import DagsterDltResource, dlt_assets
from dlt.sources.rest_api import rest_api_source

# @dlt_assets needs the source and the pipeline when the definitions load.
pipeline = dlt.pipeline(
    pipeline_name="bench_marketing",
    pipelines_dir=os.environ["BENCH_DLT_PIPELINES_DIR"],
    destination=dlt.destinations.duckdb(os.environ["BENCH_DLT_DATABASE"]),
    dataset_name=DATASET,
)


@dlt_assets(
    dlt_source=rest_api_source(source_config(os.environ["MKT_API_BASE_URL"], os.environ["MKT_API_KEY"])),
    dlt_pipeline=pipeline,
    name="marketing_dlt",
)
def marketing_dlt(context: dg.AssetExecutionContext, dlt_resource: DagsterDltResource) -> Iterator[Any]:
    yield from dlt_resource.run(context=context, loader_file_format="parquet")


dlt_sync = dg.define_asset_job("dlt_sync", selection=[marketing_dlt], executor_def=dg.in_process_executor)
defs = dg.Definitions(assets=[marketing_dlt], jobs=[dlt_sync], resources={"dlt_resource": DagsterDltResource()})
