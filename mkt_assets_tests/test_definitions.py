"""What `dg dev` (and `dagster dev`) loads: an asset per resource and normalized table, two jobs,
resources that need no key to load, and nothing the UI or --help shows in reST markup."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import dagster as dg
import pytest

from mkt_assets import cli
from mkt_assets.core.catalog import RESOURCES
from mkt_assets.core.errors import ConfigurationError
from mkt_assets.definitions import build_definitions
from mkt_assets.orchestration.settings import Settings
from mkt_assets.warehouse.normalized_tables import NORMALIZED_TABLES

defs = build_definitions()
REPO = Path(__file__).resolve().parents[1]
NORMALIZED_KEYS = {dg.AssetKey(["marketing", table.name]) for table in NORMALIZED_TABLES}
EXPECTED_KEYS = {dg.AssetKey(["marketing", spec.name]) for spec in RESOURCES}


@pytest.mark.slow  # a second or more: several real syncs
@pytest.mark.parametrize("chosen", [{}, {"MKT_RESOURCES": "contacts,tags"}, {"MKT_RESOURCES": "memberships"}])
def test_the_definitions_load_without_any_warning_and_without_a_key(chosen: dict[str, str]) -> None:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MKT_")} | chosen
    loaded = subprocess.run(
        [sys.executable, "-W", "error", "-c", "from mkt_assets.definitions import defs; defs().get_repository_def()"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stderr == ""


def test_the_project_loads_its_definitions_once_per_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from mkt_assets import definitions

    monkeypatch.setenv("MKT_RESOURCES", "contacts,tags")
    first = definitions.defs()
    # Dagster asks again for each part of one command: the same environment, the same definitions.
    assert definitions.defs() is first
    monkeypatch.setenv("MKT_RESOURCES", "contacts")
    changed = definitions.defs()

    assert changed is not first
    assert {key.path[-1] for key in changed.resolve_all_asset_keys()} == {"contacts", "contact_tags", "contact_field_values", "contact_profiles"}


def test_each_catalog_resource_is_an_asset_with_group_kinds_and_column_schema() -> None:
    specs = {spec.key: spec for spec in defs.resolve_all_asset_specs() if spec.group_name == "marketing"}

    assert set(specs) == EXPECTED_KEYS
    for resource in RESOURCES:
        spec = specs[dg.AssetKey(["marketing", resource.name])]
        assert spec.group_name == "marketing"
        assert spec.kinds == {"python", "duckdb"}
        assert spec.description == resource.description
        schema = spec.metadata["dagster/column_schema"]
        columns = {column.name: column.type for column in schema.columns}
        assert list(columns)[-3:] == ["_extra", "_synced_at", "_deleted_at"]
        assert all(columns[column.name] == column.sql_type for column in resource.columns)


@pytest.mark.parametrize("job_name", ["marketing_sync", "marketing_incremental"])
def test_both_jobs_select_every_resource_and_normalized_table_in_one_step_in_the_run_process(job_name: str) -> None:
    job = defs.resolve_job_def(job_name)

    assert job.asset_layer.executable_asset_keys == EXPECTED_KEYS | NORMALIZED_KEYS
    assert job.executor_def.name == "in_process"
    assert [node.name for node in job.nodes] == ["sync_marketing"]


def test_each_asset_can_be_materialized_alone() -> None:
    (assets,) = [a for a in defs.assets if isinstance(a, dg.AssetsDefinition)]  # type: ignore[union-attr]

    assert assets.can_subset
    assert assets.keys == EXPECTED_KEYS | NORMALIZED_KEYS


def test_the_daily_schedule_runs_the_sync_without_being_switched_on() -> None:
    schedule = defs.resolve_schedule_def("marketing_sync_daily")

    assert schedule.job_name == "marketing_sync"
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("0 3 * * *", "UTC")
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING


def test_every_asset_has_a_freshness_policy_following_the_schedule_and_an_owner() -> None:
    for spec in defs.resolve_all_asset_specs():
        assert spec.freshness_policy == dg.FreshnessPolicy.time_window(
            warn_window=timedelta(hours=25), fail_window=timedelta(hours=28)
        ), spec.key
        assert spec.owners == ["team:data-engineering"]


def test_every_asset_carries_its_checks() -> None:
    checks = {(key.asset_key.path[-1], key.name) for key in defs.resolve_asset_graph().asset_check_keys}

    expected = {
        *((resource.name, name) for resource in RESOURCES for name in ("primary_key_unique", "required_fields_present", "row_count_not_dropping", "history_is_consistent")),
        *((resource.name, (member or column).check_name) for resource in RESOURCES for column, member in resource.references()),
        *((table.name, name) for table in NORMALIZED_TABLES for name in (table.row_check, "keys_present")),
    }
    assert checks == expected
    # The catalog's references, as the UI and README name them.
    assert {
        ("contacts", "contact_tags_exist"), ("contacts", "contact_field_slugs_exist"), ("memberships", "community_ids_exist"),
        ("memberships", "contact_ids_exist"), ("enrollments", "contact_ids_exist"), ("enrollments", "course_ids_exist"),
    } <= checks  # fmt: skip


def test_settings_come_from_the_environment() -> None:
    settings = Settings.from_environment(
        {
            "MKT_SYNC_CRON": "30 1 * * *",
            "MKT_SYNC_TIMEZONE": "Europe/Paris",
            "MKT_FRESHNESS_WARN_HOURS": "2",
            "MKT_FRESHNESS_FAIL_HOURS": "3.5",
            "MKT_ASSET_OWNERS": "team:growth, ana@example.com",
            "MKT_ROW_COUNT_MAX_DROP": "0.25",
            "MKT_HISTORY": "Off",
        }
    )
    built = build_definitions(settings)

    schedule = built.resolve_schedule_def("marketing_sync_daily")
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("30 1 * * *", "Europe/Paris")
    spec = next(iter(built.resolve_all_asset_specs()))
    assert spec.freshness_policy.fail_window.to_timedelta() == timedelta(hours=3.5)  # type: ignore[union-attr]
    assert spec.owners == ["team:growth", "ana@example.com"]
    assert settings.row_count_max_drop == 0.25
    assert settings.history is False and Settings.from_environment({}).history is True
    assert "history_is_consistent" not in {key.name for key in built.resolve_asset_graph().asset_check_keys}


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"MKT_SYNC_TIMEZONE": "Mars/Olympus"}, "MKT_SYNC_TIMEZONE is not an IANA time zone"),
        ({"MKT_FRESHNESS_WARN_HOURS": "30"}, "below MKT_FRESHNESS_FAIL_HOURS"),
        ({"MKT_ROW_COUNT_MAX_DROP": "1.5"}, "MKT_ROW_COUNT_MAX_DROP must be a share"),
        ({"MKT_PROGRESS_SECONDS": "soon"}, "MKT_PROGRESS_SECONDS must be a number"),
        ({"MKT_HISTORY": "yes"}, "MKT_HISTORY must be 'on' or 'off', got 'yes'"),
        (
            {"MKT_RESOURCES": "contacts,members,tag"},
            "^MKT_RESOURCES names unknown resources 'members', 'tag'; list the resources to sync, separated by commas,"
            " from: communities, contacts, tags, contact_fields, course_resources, memberships, enrollments"
            r" \(unset syncs all\)$",
        ),
        # Not blank, yet naming nothing: read as blank it would sync everything it meant to restrict.
        ({"MKT_RESOURCES": ","}, "^MKT_RESOURCES is ',', which names no resource; list the resources to sync"),
        ({"MKT_RESOURCES": " , ,"}, r"^MKT_RESOURCES is ' , ,', which names no resource; .* \(unset or blank syncs all\)$"),
    ],
)
def test_bad_settings_are_refused_naming_the_variable(environment: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Settings.from_environment(environment)


@pytest.mark.parametrize(
    ("value", "chosen"),
    [
        (None, [spec.name for spec in RESOURCES]),
        ("", [spec.name for spec in RESOURCES]),
        ("  ", [spec.name for spec in RESOURCES]),
        # Spaces and repeats forgiven; the catalog's order kept whatever the order written.
        (" tags, contacts ,tags", ["contacts", "tags"]),
        # Any case, spelled as the catalog does.
        ("Contacts, TAGS,tags", ["contacts", "tags"]),
    ],
)
def test_mkt_resources_chooses_the_resources_and_unset_or_empty_means_all(value: str | None, chosen: list[str]) -> None:
    settings = Settings.from_environment({} if value is None else {"MKT_RESOURCES": value})
    assert [spec.name for spec in settings.resource_specs] == chosen
    assert sorted(settings.resources) == sorted(chosen)  # the catalog's names, each once


def test_a_job_syncing_one_resource_says_resource_not_resources() -> None:
    built = build_definitions(Settings(resources=("tags",)))
    assert (built.resolve_job_def("marketing_sync").description or "").startswith(
        "Read every record of the 1 marketing resource synced (tags) and write them"
    )


SUBSET = Settings.from_environment({"MKT_RESOURCES": "contacts,tags"})


def test_a_resource_left_out_is_no_asset_and_neither_job_nor_schedule_reads_it() -> None:
    built = build_definitions(SUBSET)
    synced = {dg.AssetKey(["marketing", name]) for name in ("contacts", "tags")}
    # contact_field_values stays, built without contact_fields; course_modules goes with courses.
    tables = {dg.AssetKey(["marketing", name]) for name in ("contact_tags", "contact_field_values", "contact_profiles")}

    assert {spec.key for spec in built.resolve_all_asset_specs()} == synced | tables
    for job_name, schedule_name in (("marketing_sync", "marketing_sync_daily"), ("marketing_incremental", "marketing_incremental_hourly")):
        job = built.resolve_job_def(job_name)
        assert job.asset_layer.executable_asset_keys == synced | tables
        assert [node.name for node in job.nodes] == ["sync_marketing"]
        assert built.resolve_schedule_def(schedule_name).job_name == job_name
    # The incremental job's config still names the one step, which reads contacts incrementally.
    assert "(contacts)" in (built.resolve_job_def("marketing_incremental").description or "")
    graph = built.resolve_asset_graph()
    parents = {key.path[-1]: {p.path[-1] for p in graph.get(key).parent_keys} for key in synced | tables}
    assert parents == {
        "contacts": {"tags"}, "tags": set(),
        "contact_tags": {"contacts", "tags"}, "contact_field_values": {"contacts"}, "contact_profiles": {"contacts", "tags"},
    }  # fmt: skip


def test_a_resource_left_out_takes_the_reference_checks_to_it_along() -> None:
    checks = {(key.asset_key.path[-1], key.name) for key in build_definitions(SUBSET).resolve_asset_graph().asset_check_keys}
    alone = {
        (key.asset_key.path[-1], key.name)
        for key in build_definitions(Settings(resources=("memberships",))).resolve_asset_graph().asset_check_keys
    }

    per_table = ("primary_key_unique", "required_fields_present", "row_count_not_dropping", "history_is_consistent")
    assert checks == {
        *((name, check) for name in ("contacts", "tags") for check in per_table),
        ("contacts", "contact_tags_exist"),  # not contact_field_slugs_exist: contact_fields is left out
        ("contact_tags", "matches_nested_lists"), ("contact_tags", "keys_present"),
        ("contact_field_values", "matches_nested_lists"), ("contact_field_values", "keys_present"),
        ("contact_profiles", "one_row_per_live_contact"), ("contact_profiles", "keys_present"),
    }  # fmt: skip
    # Memberships alone: no community_ids_exist nor contact_ids_exist, and no normalized table.
    assert alone == {("memberships", check) for check in per_table}


def test_a_table_built_without_a_left_out_resource_says_so_and_keeps_its_columns() -> None:
    built = {spec.key.path[-1]: spec for spec in build_definitions(SUBSET).resolve_all_asset_specs()}
    everything = {spec.key.path[-1]: spec for spec in defs.resolve_all_asset_specs()}

    profiles = built["contact_profiles"]
    assert profiles.description is not None and profiles.description.endswith(
        "Built without enrollments, memberships, left out of the synced resources:"
        " course_ids always empty, community_ids always empty."
    )
    assert profiles.metadata["dagster/column_schema"] == everything["contact_profiles"].metadata["dagster/column_schema"]
    assert built["contact_tags"].description == everything["contact_tags"].description


def test_the_hourly_incremental_schedule_is_running_and_settable() -> None:
    schedule = defs.resolve_schedule_def("marketing_incremental_hourly")
    assert (schedule.job_name, schedule.cron_schedule) == ("marketing_incremental", "30 * * * *")
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    custom = build_definitions(Settings.from_environment({"MKT_INCREMENTAL_CRON": "*/15 * * * *"}))
    assert custom.resolve_schedule_def("marketing_incremental_hourly").cron_schedule == "*/15 * * * *"


def test_the_normalized_tables_sit_downstream_of_what_they_read() -> None:
    graph = defs.resolve_asset_graph()
    parents = {key.path[-1]: {p.path[-1] for p in graph.get(key).parent_keys} for key in NORMALIZED_KEYS}
    assert parents == {
        "contact_tags": {"contacts", "tags"},
        "contact_field_values": {"contacts", "contact_fields"},
        "course_modules": {"course_resources"},
        "contact_profiles": {"contacts", "tags", "enrollments", "memberships"},
    }


def test_the_synced_assets_sit_downstream_of_what_they_reference() -> None:
    graph = defs.resolve_asset_graph()
    parents = {key.path[-1]: {p.path[-1] for p in graph.get(key).parent_keys} for key in EXPECTED_KEYS}
    assert parents == {
        "communities": set(), "tags": set(), "contact_fields": set(), "course_resources": set(),
        "contacts": {"tags", "contact_fields"},
        "memberships": {"communities", "contacts"},
        "enrollments": {"contacts", "course_resources"},
    }  # fmt: skip


def test_the_package_imports_no_private_dagster_module() -> None:
    # Dagster moves fast: its private modules change between minor versions without notice.
    private = re.compile(r"^\s*(from|import)\s+dagster\._", re.MULTILINE)
    sources = [*(REPO / "mkt_assets").rglob("*.py"), *(REPO / "mkt_assets_tests").rglob("*.py")]
    assert sources and [str(path) for path in sources if private.search(path.read_text())] == []


def test_the_package_imports_no_dagster_on_its_own() -> None:
    # The DuckDB worker imports the package: Dagster is loaded only by what Dagster loads.
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, mkt_assets, mkt_assets.warehouse.commit; print('dagster' in sys.modules)"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert loaded.stdout.strip() == "False", loaded.stderr


def _shown_texts() -> list[tuple[str, str]]:
    """Everything of the project's that the UI shows: descriptions of assets, checks, jobs,
    schedules, resources and every config field of the launchpad."""
    texts = [(f"asset {spec.key.to_user_string()}", spec.description or "") for spec in defs.resolve_all_asset_specs()]
    (assets,) = [a for a in defs.assets or [] if isinstance(a, dg.AssetsDefinition)]
    texts += [(f"check {spec.key.name}", spec.description or "") for spec in assets.check_specs]
    for name in ("marketing_sync", "marketing_incremental"):
        job = defs.resolve_job_def(name)
        texts.append((f"job {name}", job.description or ""))

        def walk(config_type: object, path: str) -> None:
            for field_name, field in getattr(config_type, "fields", {}).items():
                texts.append((f"{path}.{field_name}", field.description or ""))
                walk(field.config_type, f"{path}.{field_name}")

        walk(job.run_config_schema.config_type, name)
    texts += [(f"schedule {s.name}", s.description or "") for s in (defs.resolve_schedule_def(n) for n in ("marketing_sync_daily", "marketing_incremental_hourly"))]
    return texts


def test_nothing_the_ui_or_help_shows_is_in_rest_markup() -> None:
    texts = _shown_texts()
    for command in (["--help"], ["demo", "--help"], ["dev", "--help"], ["sandbox", "--help"]):
        shown = io.StringIO()
        with contextlib.redirect_stdout(shown), pytest.raises(SystemExit) as exited:
            cli.main(command)
        assert exited.value.code == 0
        assert shown.getvalue().startswith(f"usage: mkt-assets {' '.join(command[:-1])}".rstrip())
        texts.append((f"mkt-assets {' '.join(command)}", shown.getvalue()))

    assert len(texts) > 50
    assert [(where, text[:120]) for where, text in texts if "``" in text] == []


def test_the_project_is_declared_for_dg() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    dg_settings = project["tool"]["dg"]

    assert dg_settings["directory_type"] == "project"
    assert dg_settings["project"]["root_module"] == "mkt_assets"
    assert dg_settings["project"]["code_location_target_module"] == "mkt_assets.definitions"
    assert "dagster-dg-cli==1.13.27" in project["project"]["dependencies"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "chosen"),
    [
        (["dg", "check", "defs"], {}),
        (["dg", "list", "defs"], {}),
        (["dg", "check", "defs"], {"MKT_RESOURCES": "contacts,tags"}),
        (["dagster", "definitions", "validate", "-w", "workspace.yaml"], {}),
        (["dagster", "definitions", "validate", "-w", "workspace.yaml"], {"MKT_RESOURCES": "contacts,tags"}),
    ],
)
def test_dg_loads_the_definitions_with_no_warning(command: list[str], chosen: dict[str, str]) -> None:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MKT_")} | chosen
    ran = subprocess.run(
        [str(Path(sys.executable).with_name(command[0])), *command[1:]], cwd=REPO, env=environment,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip

    output = ran.stdout + ran.stderr
    assert ran.returncode == 0, output[-3000:]
    # Dagster's notice about its own command (superseded by dg check defs), not about ours.
    output = re.sub(r".*SupersessionWarning: Function `definitions_validate_command` is superseded.*\n.*\n", "", output)
    assert not re.search(r"(Supersession|Deprecation|Preview|Beta)Warning|warning", output, re.IGNORECASE), output[-3000:]
    if command == ["dg", "list", "defs"]:
        assert "marketing/contacts" in output and "marketing_sync" in output


@pytest.mark.parametrize(
    "url", ["https://user:pw-secret-5a@api.systeme.io/api", "user:pw-secret-5a@api.systeme.io/api", "http://10.1.1.1/api"]
)
def test_a_refused_base_url_in_the_environment_fails_the_load_in_one_line_without_its_value(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("MKT_API_BASE_URL", url)
    with pytest.raises(ConfigurationError, match=r"^MKT_API_BASE_URL ") as caught:
        build_definitions()

    assert "\n" not in str(caught.value)
    assert "pw-secret-5a" not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
