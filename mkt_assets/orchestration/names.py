"""Every name one account's definitions take, derived from its key prefix, so that several
accounts load side by side in one code location without a clash.

The default prefix, ``marketing``, keeps the names this project has always had: assets
``marketing/<resource>``, jobs ``marketing_sync`` and ``marketing_incremental``, and the
resources ``marketing_api``, ``warehouse`` and ``duckdb_io_manager`` (your own assets may ask
for ``warehouse`` by name). Another prefix, say ``acme``, gives ``acme/<resource>``,
``acme_sync``, ``acme_api``, ``acme_warehouse`` and ``acme_io_manager``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

import dagster as dg

from mkt_assets.orchestration.settings import DEFAULT_KEY_PREFIX


@dataclass(frozen=True)
class Names:
    prefix: str = DEFAULT_KEY_PREFIX

    @property
    def group(self) -> str:
        return self.prefix

    @property
    def normalized_group(self) -> str:
        return f"{self.prefix}_normalized"

    @property
    def webhooks_group(self) -> str:
        """Where webhook_events is: not in the syncs' groups, which their jobs select."""
        return f"{self.prefix}_webhooks"

    @property
    def api(self) -> str:
        return f"{self.prefix}_api"

    @property
    def warehouse(self) -> str:
        return "warehouse" if self.prefix == DEFAULT_KEY_PREFIX else f"{self.prefix}_warehouse"

    @property
    def io_manager(self) -> str:
        return "duckdb_io_manager" if self.prefix == DEFAULT_KEY_PREFIX else f"{self.prefix}_io_manager"

    @property
    def step(self) -> str:
        """The one step (op) that materializes every asset of the account."""
        return f"sync_{self.prefix}"

    @property
    def full_job(self) -> str:
        return f"{self.prefix}_sync"

    @property
    def incremental_job(self) -> str:
        return f"{self.prefix}_incremental"

    @property
    def changes_sensor(self) -> str:
        """The sensor that refreshes the contacts webhook deliveries name."""
        return f"{self.prefix}_changes"

    @property
    def refresh_job(self) -> str:
        """The job that refreshes named contacts (see ``refresh_run_config``)."""
        return f"{self.prefix}_refresh"

    @property
    def daily_schedule(self) -> str:
        return f"{self.prefix}_sync_daily"

    @property
    def hourly_schedule(self) -> str:
        return f"{self.prefix}_incremental_hourly"

    def asset_key(self, table: str) -> dg.AssetKey:
        return dg.AssetKey([self.prefix, table])

    def refresh_run_config(self, contact_ids: Iterable[int]) -> dict[str, object]:
        """The run config of a ``refresh_job`` run that refreshes ``contact_ids`` (what a sensor
        hands ``RunRequest(run_config=...)``): ``{"ops": {"sync_<prefix>": {"config":
        {"contact_ids": [...]}}}}``."""
        return {"ops": {self.step: {"config": {"contact_ids": list(contact_ids)}}}}

    def confirm_mass_deletion_config(self) -> dict[str, object]:
        """The run config of one run that applies a mass deletion (see ``assets.SyncConfig``)."""
        return {"ops": {self.step: {"config": {"confirm_mass_deletion": True}}}}

    def how_to_confirm_mass_deletion(self) -> str:
        """What a run refused for a mass deletion says to do."""
        config = json.dumps(self.confirm_mass_deletion_config())
        return (
            "If these rows really were deleted upstream, confirm it for one run: launch it with the run config"
            f" {config} (in the launchpad's config editor, or dg launch --job {self.full_job} --config-json"
            f" '{config}'); the runs after it need nothing."
        )
