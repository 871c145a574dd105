"""The Dagster resource: configuration and the API secret, turned into a client."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource
from pydantic import ConfigDict, Field, field_validator

from mkt_assets.core.catalog import DEFAULT_BASE_URL
from mkt_assets.core.errors import API_KEY_ENV
from mkt_assets.core.setting_names import SettingNames
from mkt_assets.orchestration.names import Names
from mkt_assets.source.account import (
    BASE_URL_ENV,
    check_api_key,
    check_base_url,
    shared_rate_limiter,
)
from mkt_assets.source.client import (
    DEFAULT_MAX_PAGE_BYTES,
    DEFAULT_MAX_WAIT_SECONDS,
    MAX_PAGE_SIZE,
    MIN_PAGE_SIZE,
    ORDERS,
    MarketingApiClient,
)
from mkt_assets.source.ratelimit import SharedRateLimiter
from mkt_assets.source.transport import Log, Stop
from mkt_assets.staging.pages import DEFAULT_CHUNK_PAGES
from mkt_assets.warehouse.connection import WarehouseFile, database_path
from mkt_assets.warehouse.defaults import DEFAULT_MEMORY_LIMIT, DEFAULT_WAIT_SECONDS


class MarketingApiResource(dg.ConfigurableResource):
    """Authenticated access to the marketing platform's (systeme.io) public API."""

    # pydantic quotes a refused value in its error (input_value=...), which Dagster stores in
    # the run's events: the key, or a base_url with a password in it, would be kept there.
    model_config = ConfigDict(hide_input_in_errors=True)

    base_url: str = Field(
        default=DEFAULT_BASE_URL,
        description=f"API base URL including /api (env {BASE_URL_ENV}).",
    )
    api_key: str = Field(
        default="",
        repr=False,
        description=f"API key sent as the X-API-Key header (env {API_KEY_ENV}). Secret.",
    )
    api_key_env: str = Field(
        default=API_KEY_ENV,
        description="The environment variable holding the key: read when api_key is not set, and named by every message about the key.",
    )
    component_instance: str = Field(
        default="",
        description=(
            "The key prefix of the component instance whose defs.yaml sets this account's resources and"
            " base_url, as messages name them (acme: resources); empty: the MKT_* environment variables."
        ),
    )
    page_size: int = Field(
        default=MAX_PAGE_SIZE,
        ge=MIN_PAGE_SIZE,
        le=MAX_PAGE_SIZE,
        description="Records per page (the API allows 10 to 100).",
    )
    order: str = Field(
        default="both",
        description=(
            "How lists are walked: both (default) ascends from the oldest and descends from the"
            " newest at once, meeting in the middle, in about half the time; asc reads oldest first"
            " (like both, it reads records added during the sync); desc reads newest first."
        ),
    )
    connect_timeout: float = Field(default=10.0, gt=0, description="Seconds to wait for a connection.")
    read_timeout: float = Field(
        default=60.0,
        gt=0,
        description="Seconds an answer may take, headers and body, from sending the request to its last byte.",
    )
    max_retries: int = Field(
        default=3, ge=0, le=10, description="Retries on 429, 500, 502, 503 and 504 answers."
    )
    backoff_factor: float = Field(
        default=2.0, ge=0, description="Exponential backoff factor between retries (Retry-After wins)."
    )
    max_wait_seconds: float = Field(
        default=DEFAULT_MAX_WAIT_SECONDS,
        gt=0,
        description=(
            "Longest single wait the sync accepts (Retry-After, backoff, the rate-limit refill);"
            " a server asking for longer fails the request at once, saying what it asked."
        ),
    )
    max_page_mb: int = Field(
        default=DEFAULT_MAX_PAGE_BYTES >> 20,
        ge=1,
        description="Largest answer accepted, in MiB once decompressed; a larger one fails the sync.",
    )
    staging_dir: str = Field(
        default="",
        description=(
            "Where pages are staged before the DuckDB merge (empty: <temp>/mkt_assets-<uid>/staging)."
            " A directory given must be private: yours, mode 0700 (a missing one is created so)."
            " Each process stages in its own subdirectory; a run sweeps those of runs that died."
        ),
    )
    staging_chunk_pages: int = Field(
        default=DEFAULT_CHUNK_PAGES,
        ge=1,
        description="Pages per staging chunk; each full chunk is typed to Parquet while the fetch goes on.",
    )
    pace_requests: bool = Field(
        default=True,
        description=(
            "Pace requests by the X-RateLimit headers, sharing the quota with every process on"
            " this machine, instead of relying on 429 answers."
        ),
    )
    quota_state_dir: str = Field(
        default="",
        description=(
            "Where the shared view of the quota is kept (empty: <temp>/mkt_assets-<uid>/quota)."
            " A directory given must be private: yours, mode 0700 (a missing one is created so)."
        ),
    )

    @field_validator("base_url")
    @classmethod
    def _valid_base_url(cls, value: str) -> str:
        return check_base_url(value)

    @field_validator("order")
    @classmethod
    def _valid_order(cls, value: str) -> str:
        if value not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}; got {value!r}")
        return value

    def key(self) -> str:
        """The API key: the configured one, else the environment's (the definitions leave it
        unset when the variable was not set as they loaded, so the UI opens without it)."""
        return self.checked_key()[0]

    def key_setting(self) -> str:
        """Where the key comes from, as a message names it (the definitions set ``api_key``
        from MKT_API_KEY, so a key equal to the variable's is named after the variable)."""
        if not self.api_key or self.api_key == os.environ.get(self.api_key_env):
            return self.api_key_env
        return "the marketing_api resource's api_key"

    def checked_key(self) -> tuple[str, str | None]:
        """The key as it is sent and, when whitespace around it was removed, the line saying so
        (see ``check_api_key``)."""
        return check_api_key(self.api_key or os.environ.get(self.api_key_env, ""), self.key_setting(), self.api_key_env)

    def get_client(self, log: Log | None = None, stop: Stop | None = None) -> MarketingApiClient:
        """A client; ``log`` (e.g. ``context.log.warning``) hears of long waits and odd rate-limit
        headers; once ``stop`` (the run's) is set, the client sends nothing more."""
        return MarketingApiClient(
            self.base_url,
            self.key(),
            page_size=self.page_size,
            order=self.order,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            max_retries=self.max_retries,
            backoff_factor=self.backoff_factor,
            max_wait_seconds=self.max_wait_seconds,
            max_page_bytes=self.max_page_mb << 20,
            key_setting=self.api_key_env,
            settings=SettingNames(self.component_instance),
            rate_limiter=self._rate_limiter(log),
            log=log,
            stop=stop,
        )

    def _rate_limiter(self, log: Callable[[str], None] | None = None) -> SharedRateLimiter | None:
        if not self.pace_requests:
            return None
        return shared_rate_limiter(self.base_url, self.key(), self.quota_state_dir or None, self.max_wait_seconds, log)


class WarehouseResource(DuckDBResource):
    """The DuckDB file the marketing assets write, for the checks and for your own assets:
    get_connection() as with dagster-duckdb's DuckDBResource, but queued behind this project's
    writers (and, up to wait_seconds, behind sessions opened by hand) instead of failing on
    DuckDB's lock."""

    database: str = Field(description="Path to the DuckDB file (env MKT_DUCKDB_PATH).")
    schema_name: str = Field(default="marketing", description="Schema holding the synced tables.")
    memory_limit: str = Field(
        default=DEFAULT_MEMORY_LIMIT, description="Memory DuckDB may use before spilling to disk."
    )
    wait_seconds: float = Field(
        default=DEFAULT_WAIT_SECONDS,
        ge=0,
        description="Longest wait for the DuckDB file while another process holds it (env MKT_DUCKDB_WAIT_SECONDS).",
    )
    component_instance: str = Field(
        default="",
        description=(
            "The key prefix of the component instance these settings are for, whose messages then name"
            " no MKT_* variable (an instance never reads them); empty: the MKT_* environment variables."
        ),
    )

    def file(self) -> WarehouseFile:
        """What a lean child process needs to open the file itself (see ``lean_process``)."""
        return WarehouseFile(
            database_path(self.database),
            self.memory_limit,
            wait_seconds=self.wait_seconds,
            # A component instance has no attribute for the wait: a run's config sets it.
            wait_setting=SettingNames(self.component_instance).duckdb_wait
            or f"{Names(self.component_instance).warehouse}'s wait_seconds in the run's config",
        )

    @contextmanager
    def get_connection(self, log: Log | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection that queues behind writers instead of failing on DuckDB's lock."""
        with self.file().open(log) as connection:
            yield connection
