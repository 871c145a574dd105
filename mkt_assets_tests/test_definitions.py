"""What `dagster dev` loads: five assets from the catalog, one job, resources that need no key to load."""

from __future__ import annotations

import os
import subprocess
import sys

import dagster as dg

from mkt_assets import defs
from mkt_assets.catalog import RESOURCES

EXPECTED_KEYS = {
    dg.AssetKey(["marketing", name])
    for name in ("communities", "contacts", "tags", "contact_fields", "course_resources")
}


def test_the_definitions_load_without_any_warning_and_without_a_key() -> None:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MKT_")}
    loaded = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import mkt_assets; mkt_assets.defs.get_repository_def()"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stderr == ""


def test_each_catalog_resource_is_an_asset_with_group_kinds_and_column_schema() -> None:
    specs = {spec.key: spec for spec in defs.resolve_all_asset_specs()}

    assert set(specs) == EXPECTED_KEYS
    for resource in RESOURCES:
        spec = specs[dg.AssetKey(["marketing", resource.name])]
        assert spec.group_name == "marketing"
        assert spec.kinds == {"python", "duckdb"}
        assert spec.description == resource.description
        schema = spec.metadata["dagster/column_schema"]
        columns = {column.name: column.type for column in schema.columns}
        assert list(columns)[-2:] == ["_extra", "_synced_at"]
        assert all(columns[column.name] == column.sql_type for column in resource.columns)


def test_the_sync_job_selects_all_five_and_runs_them_all_at_once() -> None:
    job = defs.resolve_job_def("marketing_sync")

    assert job.asset_layer.executable_asset_keys == EXPECTED_KEYS
    assert job.executor_def.name == "multiprocess"
    assert job.executor_def.apply_config_mapping({}).value["config"]["max_concurrent"] == 5
