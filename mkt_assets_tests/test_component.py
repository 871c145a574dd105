"""The project as a Dagster component in a project of the user's own: dg lists it, scaffolds a
defs.yaml that loads as written, and each instance is one account with names of its own; two
accounts sync side by side, each into its own file with its own quota state."""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import duckdb
import pytest
import yaml

from mkt_assets.component import MarketingSync
from mkt_assets.core.errors import ConfigurationError
from mkt_assets.definitions import build_definitions
from mkt_assets.orchestration.names import Names
from mkt_assets.orchestration.settings import Settings
from mkt_assets.sandbox import Fault, SandboxData, SandboxServer

BIN = Path(sys.executable).parent
DG_TIMEOUT_SECONDS = 300


def fresh_dg_project(root: Path, name: str = "acme_project") -> Path:
    """A dg project as a user has it before adding this package's component: a pyproject, a
    package whose definitions load its defs folder, and nothing in that folder."""
    (root / name / "defs").mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [project]
            name = "{name}"
            version = "0.1.0"
            requires-python = ">=3.10"
            dependencies = ["mkt-assets"]

            [tool.dg]
            directory_type = "project"

            [tool.dg.project]
            root_module = "{name}"

            [tool.dg.cli]
            suppress_warnings = ["project_and_activated_venv_mismatch"]
            """
        )
    )
    (root / name / "__init__.py").write_text("")
    (root / name / "defs" / "__init__.py").write_text("")
    (root / name / "definitions.py").write_text(
        textwrap.dedent(
            """
            from pathlib import Path

            import dagster as dg


            @dg.definitions
            def defs() -> dg.Definitions:
                return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
            """
        )
    )
    return root


def add_instance(project: Path, name: str, **attributes: object) -> None:
    """One account in ``project``: ``defs/<name>/defs.yaml``, its key read from ``<NAME>_API_KEY``
    and its key prefix ``name``, with ``attributes`` besides."""
    (package,) = [path.parent for path in project.glob("*/defs")]
    folder = package / "defs" / name
    folder.mkdir()
    declared = {"api_key": f"{{{{ env.{name.upper()}_API_KEY }}}}", "key_prefix": name, **attributes}
    (folder / "defs.yaml").write_text(yaml.safe_dump({"type": "mkt_assets.MarketingSync", "attributes": declared}))


def dg_command(project: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("MKT_")}
    environment.update(env or {})
    return subprocess.run(
        [str(BIN / "dg"), *args], cwd=project, env=environment, capture_output=True, text=True, timeout=DG_TIMEOUT_SECONDS
    )


# Each request takes this long, so that two syncs launched together are seen to overlap.
LATENCY_SECONDS = 0.05


@pytest.fixture()
def acme() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxData(seed=11, contacts=3000), api_key="acme-key-5d1e", latency=LATENCY_SECONDS) as server:
        yield server


@pytest.fixture()
def globex() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxData(seed=12, contacts=4500), api_key="globex-key-77c0", latency=LATENCY_SECONDS) as server:
        yield server


def stored_ids(database: Path, schema: str, table: str) -> list[int]:
    with duckdb.connect(str(database), read_only=True) as connection:
        return [row[0] for row in connection.execute(f'SELECT id FROM "{schema}"."{table}" ORDER BY id').fetchall()]


def test_a_project_with_the_package_installed_but_no_instance_loads_without_duckdb_or_requests(tmp_path: Path) -> None:
    """dg's registry describes every component type the environment holds, importing this
    package's in each process that loads any dg project: describing it costs no DuckDB,
    requests or project definitions (a fifth of a second a process)."""
    project = fresh_dg_project(tmp_path)
    script = textwrap.dedent(
        """
        import json, sys
        from pathlib import Path
        import dagster as dg

        defs = dg.load_from_defs_folder(path_within_project=Path("acme_project"))
        types = json.dumps(defs.metadata["plugin_component_types_json"].value)
        heavy = ("duckdb", "requests", "dagster_duckdb", "mkt_assets.definitions")
        print(json.dumps({"described": '"mkt_assets.MarketingSync"' in types, "imported": [m for m in heavy if m in sys.modules]}))
        """
    )
    loaded = subprocess.run([sys.executable, "-c", script], cwd=project, capture_output=True, text=True, timeout=DG_TIMEOUT_SECONDS)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert json.loads(loaded.stdout.strip().splitlines()[-1]) == {"described": True, "imported": []}


@pytest.mark.slow  # a second or more: dg starts a process per command
def test_dg_scaffolds_the_component_into_a_fresh_project_where_it_checks_and_launches_after_two_edits(
    acme: SandboxServer, tmp_path: Path
) -> None:
    project = fresh_dg_project(tmp_path)
    listed = dg_command(project, "list", "components")
    assert listed.returncode == 0, listed.stderr
    assert "mkt_assets.MarketingSync" in listed.stdout

    scaffolded = dg_command(project, "scaffold", "defs", "mkt_assets.MarketingSync", "acme")
    assert scaffolded.returncode == 0, scaffolded.stderr
    defs_yaml = project / "acme_project" / "defs" / "acme" / "defs.yaml"
    written = yaml.safe_load(defs_yaml.read_text())
    assert written == {
        "type": "mkt_assets.MarketingSync",
        "attributes": {
            "api_key": "{{ env.ACME_API_KEY }}",
            "key_prefix": "acme",
            "database": "data/acme_warehouse.duckdb",
            "base_url": "https://api.systeme.io/api",
            # Unset, the changes sensor stays off; set, the account's webhooks are acted on.
            "webhook_secret": "{{ env.ACME_WEBHOOK_SECRET }}",
        },
    }
    # The user's edit: where the API is (here, the simulator); the key goes in the environment.
    defs_yaml.write_text(defs_yaml.read_text().replace("https://api.systeme.io/api", acme.base_url))

    checked = dg_command(project, "check", "defs")
    assert checked.returncode == 0, checked.stderr
    assert "warning" not in (checked.stdout + checked.stderr).lower()

    home = tmp_path / "dagster_home"
    home.mkdir()
    launched = dg_command(
        project, "launch", "--job", "acme_sync", env={"ACME_API_KEY": "acme-key-5d1e", "DAGSTER_HOME": str(home)}
    )
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    assert "RUN_SUCCESS" in launched.stdout + launched.stderr
    database = project / "data" / "acme_warehouse.duckdb"
    assert stored_ids(database, "acme", "contacts") == sorted(acme.data.contact_ids)
    # The key is shown by its variable's name, never its value.
    assert "acme-key-5d1e" not in launched.stdout + launched.stderr


@pytest.mark.slow  # dg check defs in a process of its own: 5 s
def test_a_key_written_into_defs_yaml_is_refused_without_quoting_it(tmp_path: Path) -> None:
    project = fresh_dg_project(tmp_path)
    folder = project / "acme_project" / "defs" / "acme"
    folder.mkdir()
    (folder / "defs.yaml").write_text(
        "type: mkt_assets.MarketingSync\nattributes:\n  api_key: sk-live-4f9a2b7c\n  key_prefix: acme\n"
    )
    checked = dg_command(project, "check", "defs")
    assert checked.returncode != 0
    output = checked.stdout + checked.stderr
    assert "acme: api_key must name the environment variable holding the key, as \"{{ env.ACME_KEY }}\"" in output
    assert "sk-live-4f9a2b7c" not in output


def two_accounts(acme: SandboxServer, globex: SandboxServer, tmp_path: Path) -> dg.Definitions:
    """Two instances as two defs.yaml would make them: their own keys, prefixes, files."""
    return dg.Definitions.merge(
        *(
            dg.build_defs_for_component(component=MarketingSync.resolve_from_yaml(
                textwrap.dedent(
                    f"""
                    api_key: "{{{{ env.{name.upper()}_API_KEY }}}}"
                    key_prefix: {name}
                    base_url: {server.base_url}
                    database: {tmp_path / f"{name}.db"}
                    """
                )
            ))
            for name, server in (("acme", acme), ("globex", globex))
        )
    )


def test_two_accounts_load_side_by_side_with_names_of_their_own(
    acme: SandboxServer, globex: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACME_API_KEY", "acme-key-5d1e")
    monkeypatch.setenv("GLOBEX_API_KEY", "globex-key-77c0")
    defs = two_accounts(acme, globex, tmp_path)

    jobs = {job.name for job in defs.resolve_all_job_defs() if not job.name.startswith("__")}
    assert jobs == {"acme_sync", "acme_incremental", "acme_refresh", "globex_sync", "globex_incremental", "globex_refresh"}
    assert {schedule.name for schedule in defs.schedules or []} == {  # type: ignore[union-attr]
        "acme_sync_daily", "acme_incremental_hourly", "globex_sync_daily", "globex_incremental_hourly",
    }  # fmt: skip
    keys = set(defs.resolve_all_asset_keys())
    assert dg.AssetKey(["acme", "contacts"]) in keys and dg.AssetKey(["globex", "contacts"]) in keys
    assert {key.path[0] for key in keys} == {"acme", "globex"}
    checks = {key.asset_key.path[0] for key in defs.resolve_asset_graph().asset_check_keys}
    assert checks == {"acme", "globex"}
    # Each account's step asks for its own resources, and its assets are written by its own IO manager.
    for name in ("acme", "globex"):
        step = defs.resolve_assets_def(dg.AssetKey([name, "contacts"]))
        assert step.required_resource_keys >= {f"{name}_api", f"{name}_warehouse", f"{name}_io_manager"}
        assert not any(key.startswith("acme" if name == "globex" else "globex") for key in step.required_resource_keys)


@pytest.mark.slow  # a second or more: several real syncs
def test_two_accounts_sync_at_once_each_into_its_own_file_with_its_own_quota_state(
    acme: SandboxServer, globex: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = fresh_dg_project(tmp_path)
    for name, server in (("acme", acme), ("globex", globex)):
        add_instance(project, name, base_url=server.base_url, database=f"data/{name}_warehouse.duckdb")
    quota = tmp_path / "quota"
    environment = {
        **{key: value for key, value in os.environ.items() if not key.startswith("MKT_")},
        "ACME_API_KEY": "acme-key-5d1e",
        "GLOBEX_API_KEY": "globex-key-77c0",
        "TMPDIR": str(quota),
    }
    quota.mkdir()
    runs = []
    for name in ("acme", "globex"):
        home = tmp_path / f"home_{name}"
        home.mkdir()
        runs.append(
            subprocess.Popen(
                [str(BIN / "dg"), "launch", "--job", f"{name}_sync"],
                cwd=project, env={**environment, "DAGSTER_HOME": str(home)},
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
        )
    outputs = [run.communicate(timeout=DG_TIMEOUT_SECONDS)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [output[-3000:] for output in outputs]

    # Both ran at once: each one's requests began before the other's ended.
    spans = [(min(r.at for r in server.requests), max(r.at for r in server.requests)) for server in (acme, globex)]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]
    for name, server in (("acme", acme), ("globex", globex)):
        database = project / "data" / f"{name}_warehouse.duckdb"
        assert stored_ids(database, name, "contacts") == sorted(server.data.contact_ids)
        assert stored_ids(database, name, "tags") == sorted(server.data.tag_ids)
    # Each account paced by its own quota state, whose name holds neither key.
    states = sorted(path.name for path in quota.rglob("mkt_assets_quota_*.json"))
    assert len(states) == 2
    assert not any(re.search("acme-key|globex-key", name) for name in states)


def test_every_name_follows_the_key_prefix_and_the_default_keeps_this_projects_names() -> None:
    assert (Names().full_job, Names().api, Names().warehouse, Names().io_manager, Names().step) == (
        "marketing_sync", "marketing_api", "warehouse", "duckdb_io_manager", "sync_marketing",
    )  # fmt: skip
    acme = Names("acme")
    assert (acme.full_job, acme.incremental_job, acme.refresh_job, acme.api, acme.warehouse, acme.io_manager) == (
        "acme_sync", "acme_incremental", "acme_refresh", "acme_api", "acme_warehouse", "acme_io_manager",
    )  # fmt: skip
    assert acme.refresh_run_config([7, 3]) == {"ops": {"sync_acme": {"config": {"contact_ids": [7, 3]}}}}
    defs = build_definitions(Settings(key_prefix="acme", duckdb_path=":memory:"))
    assert {key.path[0] for key in defs.resolve_all_asset_keys()} == {"acme"}
    assert defs.resolve_job_def("acme_sync") is not None


def test_a_rejected_key_names_the_variable_the_instance_reads_it_from(
    acme: SandboxServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACME_API_KEY", "not-the-acme-key")
    instance = MarketingSync.resolve_from_yaml(
        f'api_key: "{{{{ env.ACME_API_KEY }}}}"\nkey_prefix: acme\nbase_url: {acme.base_url}\n'
        f"database: {tmp_path / 'acme.db'}\nresources: [tags]\n"
    )
    job = dg.build_defs_for_component(component=instance).resolve_job_def("acme_sync")

    result = job.execute_in_process(instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)

    (failure,) = result.get_step_failure_events()
    message = failure.event_specific_data.error.to_string()  # type: ignore[union-attr]
    assert "HTTP 401: the API key was rejected" in message and "set ACME_API_KEY to a valid key" in message
    assert "MKT_API_KEY" not in message and "not-the-acme-key" not in message


def test_a_refused_base_url_names_the_instances_attribute_not_the_environment_variable(tmp_path: Path) -> None:
    instance = MarketingSync.resolve_from_yaml(
        f'api_key: "{{{{ env.ACME_API_KEY }}}}"\nkey_prefix: acme\nbase_url: http://api.example.com/api\ndatabase: {tmp_path / "a.db"}\n'
    )
    with pytest.raises(Exception, match=r"acme: base_url must use https \(plain http is allowed only for loopback hosts") as refused:
        dg.build_defs_for_component(component=instance)
    assert "MKT_API_BASE_URL" not in str(refused.value)


# ------------------------------------------ every message names what a defs.yaml user sets


def acme_instance(tmp_path: Path, base_url: str = "https://api.systeme.io/api", **attributes: object) -> MarketingSync:
    lines = [
        'api_key: "{{ env.ACME_API_KEY }}"', "key_prefix: acme", f"base_url: {base_url}", f"database: {tmp_path / 'acme.db'}",
        *(f"{name}: {json.dumps(value)}" for name, value in attributes.items()),
    ]  # fmt: skip
    return MarketingSync.resolve_from_yaml("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("attributes", "said"),
    [
        ({"deletions": "erase"}, "acme: deletions must be 'mark' or 'delete', got 'erase'"),
        (
            {"resources": ["contacts", "members"]},
            "acme: resources names unknown resource 'members'; list the resources to sync, as a list, from: communities,",
        ),
        ({"resources": []}, "acme: resources names no resource; list the resources to sync, as a list, from: "),
        ({"timezone": "Mars/Olympus"}, "acme: timezone is not an IANA time zone: 'Mars/Olympus'"),
        (
            {"freshness_warn_hours": 30, "freshness_fail_hours": 28},
            "acme: freshness_warn_hours must be positive and below acme: freshness_fail_hours",
        ),
    ],
)
def test_a_component_instances_refused_setting_names_its_attribute_not_an_environment_variable(
    tmp_path: Path, attributes: dict[str, object], said: str
) -> None:
    with pytest.raises(ConfigurationError) as refused:
        dg.build_defs_for_component(component=acme_instance(tmp_path, **attributes))
    assert str(refused.value).startswith(said)
    assert "MKT_" not in str(refused.value)
    if "resources" in attributes:
        assert str(refused.value).endswith("(left out syncs all)")


def test_a_component_instances_resources_are_read_whatever_their_case_and_spaces_as_the_environments_are(tmp_path: Path) -> None:
    instance = acme_instance(tmp_path, resources=["Tags", " CONTACTS", "tags"])

    assert instance.settings().resources == ("tags", "contacts")
    keys = {key.to_user_string() for key in dg.build_defs_for_component(component=instance).resolve_all_asset_keys()}
    assert {"acme/tags", "acme/contacts"} <= keys and "acme/communities" not in keys


def test_a_base_url_with_credentials_in_a_component_instance_names_the_variable_its_key_comes_from(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as refused:
        dg.build_defs_for_component(component=acme_instance(tmp_path, base_url="https://user:pw@api.systeme.io/api"))
    assert "acme: base_url must not carry credentials" in str(refused.value)
    assert "the API takes its key from ACME_API_KEY;" in str(refused.value)
    assert "MKT_" not in str(refused.value) and "user:pw" not in str(refused.value)


@pytest.fixture()
def small_acme(monkeypatch: pytest.MonkeyPatch) -> Iterator[SandboxServer]:
    monkeypatch.setenv("ACME_API_KEY", "acme-key-5d1e")
    with SandboxServer(SandboxData(seed=13, contacts=30), api_key="acme-key-5d1e") as server:
        yield server


def failed_run(instance: MarketingSync, job: str = "acme_sync") -> str:
    """What the failed step of one run of ``job`` says."""
    result = (
        dg.build_defs_for_component(component=instance)
        .resolve_job_def(job)
        .execute_in_process(instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    )
    (failure,) = result.get_step_failure_events()
    return failure.event_specific_data.error.to_string()  # type: ignore[union-attr]


def test_a_resource_a_component_instances_account_cannot_read_is_left_out_in_its_defs_yaml(
    small_acme: SandboxServer, tmp_path: Path
) -> None:
    small_acme.add_fault(Fault("status", path="/api/community/memberships", status=403, times=-1))
    said = failed_run(acme_instance(tmp_path, small_acme.base_url, resources=["tags", "memberships"]))

    assert (
        "HTTP 403: the account cannot read memberships (the API said \"Forbidden\"); the key is not at fault, so keep it."
        " Leave memberships out by listing the resources to sync in acme: resources (a list; left out, all are synced)"
    ) in said
    assert "To sync the others without memberships: acme: resources: [tags]" in said
    assert "MKT_" not in said


def test_a_wrong_base_url_of_a_component_instance_is_said_naming_its_attribute(small_acme: SandboxServer, tmp_path: Path) -> None:
    wrong = small_acme.base_url + "/v0"
    said = failed_run(acme_instance(tmp_path, wrong, resources=["tags", "contact_fields"]))

    assert f"the base URL is probably wrong, not the key nor the account. acme: base_url is {wrong};" in said
    assert "correct it (left out, the API's own address is used) and run again." in said
    assert "MKT_" not in said


def test_a_component_instances_file_held_too_long_is_said_naming_no_environment_variable(
    small_acme: SandboxServer, tmp_path: Path
) -> None:
    instance = acme_instance(tmp_path, small_acme.base_url, resources=["tags"])
    job = dg.build_defs_for_component(component=instance).resolve_job_def("acme_sync")
    # Another writer of the project holds the file: the run waits no longer than it is told.
    with open(tmp_path / "acme.db.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = job.execute_in_process(
            run_config={"resources": {Names("acme").warehouse: {"config": {"wait_seconds": 0}}}},
            instance=dg.DagsterInstance.ephemeral(),
            raise_on_error=False,
        )
    (failure,) = result.get_step_failure_events()
    said = failure.event_specific_data.error.to_string()  # type: ignore[union-attr]

    assert "longer than the 0 s a sync waits (acme_warehouse's wait_seconds in the run's config), by " in said
    assert "MKT_" not in said


@pytest.mark.slow  # a second or more: two real syncs
def test_a_mass_deletion_refused_for_a_component_instance_names_its_deletions_attribute(
    small_acme: SandboxServer, tmp_path: Path
) -> None:
    instance = acme_instance(tmp_path, small_acme.base_url, resources=["tags"], deletions="delete")
    job = dg.build_defs_for_component(component=instance).resolve_job_def("acme_sync")
    assert job.execute_in_process(instance=dg.DagsterInstance.ephemeral()).success
    small_acme.add_fault(Fault("empty", path="/api/tags", times=-1))

    said = failed_run(instance)

    assert f"acme.tags: the API's complete list (0 records) lacks all {len(small_acme.data.tag_ids)} of the table's live rows" in said
    assert "the sync would remove them (acme: deletions: delete)" in said
    # A component instance cannot set the share (it keeps the default): no setting is named for it.
    assert "at most 10% of a table's live rows or 5 rows, whichever is more" in said
    assert "MKT_" not in said
