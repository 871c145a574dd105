"""The project as a Dagster component: one instance per systeme.io account, scaffolded into any
dg project with ``dg scaffold defs mkt_assets.MarketingSync <name>`` and configured in its
``defs.yaml``. Each instance is the same definitions this project loads for itself (its
assets, checks, two jobs, two schedules and three resources), named after its ``key_prefix``
(see ``names``), so several accounts load side by side in one code location.
"""

import re
from dataclasses import replace
from datetime import timedelta
from typing import Annotated

import dagster as dg
from pydantic import Field

from mkt_assets.core.catalog import DEFAULT_BASE_URL, RESOURCES
from mkt_assets.core.deliveries import WEBHOOK_SECRET_ENV
from mkt_assets.core.errors import ConfigurationError
from mkt_assets.core.setting_names import SettingNames
from mkt_assets.orchestration.settings import DEFAULT_DUCKDB_PATH, DEFAULT_KEY_PREFIX, Settings, in_catalog_spelling

_HOUR = timedelta(hours=1)
# What api_key resolves to when it is not a template naming a variable (a key written out).
_NOT_A_TEMPLATE = ""
# The one form a secret may take in defs.yaml: a template naming an environment variable.
_ENV_TEMPLATE = re.compile(r"\{\{\s*env(?:\.(?P<dotted>[A-Za-z_][A-Za-z0-9_]*)|\(\s*['\"](?P<called>[A-Za-z_][A-Za-z0-9_]*)['\"]\s*\))\s*\}\}")


def _api_key_from_environment(context: dg.ResolutionContext, raw: str) -> str:
    """``"{{ env.ACME_KEY }}"`` names the variable ``ACME_KEY``: the run reads it when it starts,
    the UI shows the name, and the value is never rendered into the definitions. A key written
    out in the file is refused, without quoting it."""
    found = _ENV_TEMPLATE.fullmatch(raw.strip()) if isinstance(raw, str) else None
    # Refused when the definitions are built, not here: dg quotes the YAML line of an error
    # raised while resolving, and that line would be the key.
    return (found["dotted"] or found["called"]) if found is not None else _NOT_A_TEMPLATE


ApiKey = Annotated[
    str,
    dg.Resolver(
        _api_key_from_environment,
        model_field_type=str,
        inject_before_resolve=False,
        description='The environment variable holding the account\'s API key, as "{{ env.ACME_KEY }}".',
        examples=["{{ env.MKT_API_KEY }}"],
    ),
]
WebhookSecret = Annotated[
    str,
    dg.Resolver(
        _api_key_from_environment,
        model_field_type=str,
        inject_before_resolve=False,
        description=(
            'The environment variable holding the webhook secret, as "{{ env.ACME_WEBHOOK_SECRET }}": set, the'
            " <key_prefix>_changes sensor runs from the start."
        ),
        examples=["{{ env.MKT_WEBHOOK_SECRET }}"],
    ),
]


class MarketingSyncScaffolder(dg.Scaffolder[dg.Model]):
    """``dg scaffold defs mkt_assets.MarketingSync acme`` writes a defs.yaml that loads as it is:
    the instance's name is its key prefix, its key comes from ``<NAME>_API_KEY`` and its tables
    go to ``data/<name>_warehouse.duckdb`` (a file named like the schema would make
    ``<name>.contacts`` ambiguous in DuckDB). Edit the two lines you need, then ``dg check defs``."""

    def scaffold(self, request: dg.ScaffoldRequest[dg.Model]) -> None:
        name = re.sub(r"[^a-z0-9_]", "_", request.target_path.name.lower()).strip("_") or "marketing"
        if not name[0].isalpha():
            name = f"account_{name}"
        dg.scaffold_component(
            request,
            {
                "api_key": f"{{{{ env.{name.upper()}_API_KEY }}}}",
                "key_prefix": name,
                "database": f"data/{name}_warehouse.duckdb",
                "base_url": DEFAULT_BASE_URL,
                "webhook_secret": f"{{{{ env.{name.upper()}_WEBHOOK_SECRET }}}}",
            },
        )


@dg.scaffold_with(MarketingSyncScaffolder)
class MarketingSync(dg.Component, dg.Model, dg.Resolvable):
    """One systeme.io account kept in DuckDB: an asset per API resource and per normalized
    table, their checks, a daily full sync and an hourly incremental one."""

    api_key: ApiKey
    from_environment: bool = Field(
        default=False,
        description=(
            "Take every setting but api_key and key_prefix from the MKT_* environment variables, as"
            " the mkt_assets project's own instance does (see its docs/configuration.md)."
        ),
    )
    base_url: str = Field(default=DEFAULT_BASE_URL, description="The API's base URL.")
    database: str = Field(default=DEFAULT_DUCKDB_PATH, description="The DuckDB file, relative to where Dagster runs.")
    schema_name: str | None = Field(
        default=None, alias="schema", description="The DuckDB schema of the tables (default: the key prefix)."
    )
    key_prefix: str = Field(
        default=DEFAULT_KEY_PREFIX,
        description="The first part of every asset key, and of the jobs' names: <key_prefix>_sync, <key_prefix>_incremental.",
    )
    resources: list[str] | None = Field(
        default=None, description=f"The resources to sync (default: all of {', '.join(spec.name for spec in RESOURCES)})."
    )
    deletions: str = Field(default=Settings.deletions, description="'mark' rows gone upstream (_deleted_at) or 'delete' them.")
    history: bool = Field(default=Settings.history, description="Keep <table>_history, every version of every row.")
    sync_cron: str = Field(default=Settings.sync_cron, description="When the daily full sync runs.")
    incremental_cron: str = Field(default=Settings.incremental_cron, description="When the incremental sync runs.")
    timezone: str = Field(default=Settings.sync_timezone, description="Time zone of both schedules (IANA name).")
    freshness_warn_hours: float = Field(
        default=Settings.freshness_warn / _HOUR, gt=0, description="Hours after a materialization an asset turns warn."
    )
    freshness_fail_hours: float = Field(default=Settings.freshness_fail / _HOUR, gt=0, description="... and fail.")
    owners: list[str] = Field(default_factory=lambda: list(Settings.owners), description="Owners of every asset.")
    webhook_secret: WebhookSecret | None = Field(
        default=None,
        description="The variable holding the webhook secret (see docs/webhooks.md); from_environment: MKT_WEBHOOK_SECRET.",
    )

    def settings(self) -> Settings:
        if self.from_environment:
            return replace(Settings.from_environment(), key_prefix=self.key_prefix)
        return Settings(
            duckdb_path=self.database,
            key_prefix=self.key_prefix,
            schema=self.schema_name or "",
            resources=in_catalog_spelling(self.resources) if self.resources is not None else Settings.resources,
            deletions=self.deletions,
            history=self.history,
            sync_cron=self.sync_cron,
            incremental_cron=self.incremental_cron,
            sync_timezone=self.timezone,
            freshness_warn=self.freshness_warn_hours * _HOUR,
            freshness_fail=self.freshness_fail_hours * _HOUR,
            owners=tuple(self.owners),
            setting_names=SettingNames(self.key_prefix),
        )

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        if self.api_key == _NOT_A_TEMPLATE:
            raise ConfigurationError(
                f'{self.key_prefix}: api_key must name the environment variable holding the key, as "{{{{ env.ACME_KEY }}}}";'
                " a key written in defs.yaml would be shown in the UI and kept in version control"
            )
        if self.webhook_secret == _NOT_A_TEMPLATE:
            raise ConfigurationError(
                f'{self.key_prefix}: webhook_secret must name the environment variable holding the secret, as'
                ' "{{ env.ACME_WEBHOOK_SECRET }}"; a secret written in defs.yaml would be shown in the UI and kept in version control'
            )
        # Imported here, not with the module: dg's registry imports this module in every project
        # of an environment that has this package, to describe the component, and describing it
        # should not import DuckDB, requests and the whole project.
        from mkt_assets.definitions import build_definitions

        webhook_secret_env = self.webhook_secret or (WEBHOOK_SECRET_ENV if self.from_environment else None)
        # From the environment, MKT_API_BASE_URL applies; an instance of its own never reads it,
        # so one variable cannot send every account's key elsewhere.
        return build_definitions(
            self.settings(),
            api_key_env=self.api_key,
            base_url=None if self.from_environment else self.base_url,
            webhook_secret_env=webhook_secret_env,
        )
