"""Deployment settings read from the environment when the definitions load.

Secrets are not here: the API key stays an ``EnvVar`` on the resource so Dagster never
records its value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from mkt_assets.core.catalog import RESOURCES, RESOURCES_BY_NAME, ResourceSpec
from mkt_assets.core.errors import DUCKDB_PATH_ENV, ConfigurationError
from mkt_assets.core.setting_names import ENVIRONMENT, SettingNames
from mkt_assets.warehouse.defaults import DEFAULT_MAX_DROP, DEFAULT_MEMORY_LIMIT, DEFAULT_WAIT_SECONDS

# Not data/marketing.duckdb: DuckDB names a file's catalog after it, and a catalog named
# like the schema makes every `marketing.<table>` a user types ambiguous.
DEFAULT_DUCKDB_PATH = "data/mkt_assets.duckdb"
RESOURCES_ENV = "MKT_RESOURCES"


DEFAULT_KEY_PREFIX = "marketing"
# What a key prefix may be: one word that is at once an asset key part, part of a job, schedule
# and resource name, and (by default) a DuckDB schema.
_KEY_PREFIX = re.compile(r"[a-z][a-z0-9_]{0,39}")


@dataclass(frozen=True)
class Settings:
    duckdb_path: str = DEFAULT_DUCKDB_PATH
    # One account's definitions: its assets are <key_prefix>/<resource>, its jobs
    # <key_prefix>_sync and <key_prefix>_incremental (see ``names``); its tables land in
    # ``schema`` (default: the key prefix).
    key_prefix: str = DEFAULT_KEY_PREFIX
    schema: str = ""
    sync_cron: str = "0 3 * * *"
    sync_timezone: str = "UTC"
    # Hourly, at half past: clear of the daily full sync's start.
    incremental_cron: str = "30 * * * *"
    deletions: str = "mark"
    # Keep <table>_history beside each synced table (see ``history``).
    history: bool = True
    freshness_warn: timedelta = timedelta(hours=25)
    freshness_fail: timedelta = timedelta(hours=28)
    owners: tuple[str, ...] = ("team:data-engineering",)
    # Both the row count check's bound and the share of a table's live rows a complete read
    # may mark gone before the run must confirm it (see ``merge.is_mass_deletion``).
    row_count_max_drop: float = DEFAULT_MAX_DROP
    progress_interval_seconds: float = 10.0
    duckdb_memory_limit: str = DEFAULT_MEMORY_LIMIT
    duckdb_wait_seconds: float = DEFAULT_WAIT_SECONDS
    # The resources both jobs sync (catalog names); the others are not in the definitions at
    # all, so an account whose plan lacks one can still sync the rest.
    resources: tuple[str, ...] = tuple(spec.name for spec in RESOURCES)
    # How many times the daemon retries a failed run of the jobs, and how long the first retry
    # waits after the failure (doubled for each retry after it; see ``run_retries``).
    run_retries: int = 3
    run_retry_delay_seconds: float = 120.0
    # How long after a failed read began the next run may continue it (see ``resume``); 0: never.
    resume_window: timedelta = timedelta(hours=6)
    # How messages name the settings: the MKT_* variables, or a component instance's attributes.
    setting_names: SettingNames = ENVIRONMENT

    def __post_init__(self) -> None:
        if not _KEY_PREFIX.fullmatch(self.key_prefix):
            raise ConfigurationError(
                f"key_prefix must be a lowercase word of letters, digits and underscores starting with a letter"
                f" (at most 40 characters), got {self.key_prefix!r}"
            )
        if self.schema and not _KEY_PREFIX.fullmatch(self.schema):
            raise ConfigurationError(
                f"schema must be a lowercase word of letters, digits and underscores starting with a letter"
                f" (at most 40 characters), got {self.schema!r}"
            )
        names = self.setting_names
        try:
            ZoneInfo(self.sync_timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigurationError(
                f"{names.timezone} is not an IANA time zone: {self.sync_timezone!r}"
            ) from None
        if not timedelta(0) < self.freshness_warn < self.freshness_fail:
            raise ConfigurationError(f"{names.freshness_warn} must be positive and below {names.freshness_fail}")
        if not 0 <= self.row_count_max_drop < 1:
            raise ConfigurationError("MKT_ROW_COUNT_MAX_DROP must be a share from 0 to below 1, e.g. 0.1")
        if self.deletions not in ("mark", "delete"):
            raise ConfigurationError(f"{names.deletions} must be 'mark' or 'delete', got {self.deletions!r}")
        if self.progress_interval_seconds <= 0:
            raise ConfigurationError("MKT_PROGRESS_SECONDS must be positive")
        if self.resume_window < timedelta(0):
            raise ConfigurationError("MKT_RESUME_HOURS must be zero (never resume) or more, e.g. 6")
        if self.duckdb_wait_seconds < 0:
            raise ConfigurationError("MKT_DUCKDB_WAIT_SECONDS must be zero or more")
        if self.run_retries < 0:
            raise ConfigurationError(f"MKT_RUN_RETRIES must be 0 (never retried) or more, got {self.run_retries}")
        if self.run_retry_delay_seconds < 0:
            raise ConfigurationError("MKT_RUN_RETRY_DELAY_SECONDS must be zero or more")
        unknown = [name for name in self.resources if name not in RESOURCES_BY_NAME]
        if unknown or not self.resources:
            problem = f"unknown resource{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}" if unknown else "no resource"
            raise ConfigurationError(
                f"{names.resources} names {problem}; list the resources to sync, {names.resources_written},"
                f" from: {', '.join(spec.name for spec in RESOURCES)} ({names.left_out} syncs all)"
            )

    @property
    def schema_name(self) -> str:
        """The DuckDB schema of the tables: ``schema``, else the key prefix."""
        return self.schema or self.key_prefix

    @property
    def resource_specs(self) -> tuple[ResourceSpec, ...]:
        """The chosen resources, in the catalog's order."""
        return tuple(spec for spec in RESOURCES if spec.name in self.resources)

    @classmethod
    def from_environment(cls, environment: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environment is None else environment
        defaults = cls()

        def number(name: str, default: float) -> float:
            raw = env.get(name)
            if not raw:
                return default
            try:
                return float(raw)
            except ValueError:
                raise ConfigurationError(f"{name} must be a number, got {raw!r}") from None

        def whole(name: str, default: int) -> int:
            raw = (env.get(name) or "").strip()
            if not raw:
                return default
            try:
                return int(raw)
            except ValueError:
                raise ConfigurationError(f"{name} must be a whole number, got {raw!r}") from None

        def switch(name: str, default: bool) -> bool:
            raw = (env.get(name) or "").strip().lower()
            if not raw:
                return default
            if raw not in ("on", "off"):
                raise ConfigurationError(f"{name} must be 'on' or 'off', got {env[name]!r}")
            return raw == "on"

        owners = env.get("MKT_ASSET_OWNERS")
        chosen = _chosen_resources(env.get(RESOURCES_ENV) or "")
        return cls(
            duckdb_path=env.get(DUCKDB_PATH_ENV) or defaults.duckdb_path,
            sync_cron=env.get("MKT_SYNC_CRON") or defaults.sync_cron,
            sync_timezone=env.get("MKT_SYNC_TIMEZONE") or defaults.sync_timezone,
            incremental_cron=env.get("MKT_INCREMENTAL_CRON") or defaults.incremental_cron,
            deletions=env.get("MKT_DELETIONS") or defaults.deletions,
            history=switch("MKT_HISTORY", defaults.history),
            freshness_warn=timedelta(
                hours=number("MKT_FRESHNESS_WARN_HOURS", defaults.freshness_warn / timedelta(hours=1))
            ),
            freshness_fail=timedelta(
                hours=number("MKT_FRESHNESS_FAIL_HOURS", defaults.freshness_fail / timedelta(hours=1))
            ),
            owners=tuple(o.strip() for o in owners.split(",") if o.strip()) if owners else defaults.owners,
            row_count_max_drop=number("MKT_ROW_COUNT_MAX_DROP", defaults.row_count_max_drop),
            progress_interval_seconds=number("MKT_PROGRESS_SECONDS", defaults.progress_interval_seconds),
            duckdb_memory_limit=env.get("MKT_DUCKDB_MEMORY_LIMIT") or defaults.duckdb_memory_limit,
            duckdb_wait_seconds=number("MKT_DUCKDB_WAIT_SECONDS", defaults.duckdb_wait_seconds),
            resources=chosen or defaults.resources,
            run_retries=whole("MKT_RUN_RETRIES", defaults.run_retries),
            run_retry_delay_seconds=number("MKT_RUN_RETRY_DELAY_SECONDS", defaults.run_retry_delay_seconds),
            resume_window=timedelta(hours=number("MKT_RESUME_HOURS", defaults.resume_window / timedelta(hours=1))),
        )


def _chosen_resources(value: str) -> tuple[str, ...]:
    """The resources ``MKT_RESOURCES`` names, in the catalog's spelling whatever their case
    (``Contacts``); empty when it is blank (all are synced). A value naming nothing (``,``)
    is refused: read as blank, it would sync what it was meant to restrict."""
    if not value.strip():
        return ()
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise ConfigurationError(
            f"{RESOURCES_ENV} is {value!r}, which names no resource; list the resources to sync, separated by"
            f" commas, from: {', '.join(spec.name for spec in RESOURCES)} (unset or blank syncs all)"
        )
    return in_catalog_spelling(names)


def in_catalog_spelling(names: Iterable[str]) -> tuple[str, ...]:
    """``names`` as the catalog spells them whatever their case or the spaces around them
    (`` Contacts``), each once, in their order; a name the catalog lacks is kept as given, for
    ``Settings`` to refuse."""
    spelled = {spec.name.lower(): spec.name for spec in RESOURCES}
    return tuple(dict.fromkeys(spelled.get(name.strip().lower(), name) for name in names))
