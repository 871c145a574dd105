"""How a message names the settings it advises on, so that it names what its reader sets: this
project's own ``MKT_*`` environment variables, or the attributes of one component instance's
``defs.yaml`` (which never reads those variables)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# The environment variable, and the component's attribute, of each setting a message names.
_SETTINGS = {
    "base_url": ("MKT_API_BASE_URL", "base_url"),
    "resources": ("MKT_RESOURCES", "resources"),
    "deletions": ("MKT_DELETIONS", "deletions"),
    "timezone": ("MKT_SYNC_TIMEZONE", "timezone"),
    "freshness_warn": ("MKT_FRESHNESS_WARN_HOURS", "freshness_warn_hours"),
    "freshness_fail": ("MKT_FRESHNESS_FAIL_HOURS", "freshness_fail_hours"),
}


@dataclass(frozen=True)
class SettingNames:
    """``SettingNames()``: the environment variables (``MKT_RESOURCES``).
    ``SettingNames("acme")``: the attributes of the component instance whose key prefix is
    ``acme``, as ``acme: resources``."""

    instance: str = ""

    def _name(self, setting: str) -> str:
        variable, attribute = _SETTINGS[setting]
        return f"{self.instance}: {attribute}" if self.instance else variable

    @property
    def base_url(self) -> str:
        return self._name("base_url")

    @property
    def resources(self) -> str:
        return self._name("resources")

    @property
    def deletions(self) -> str:
        return self._name("deletions")

    @property
    def timezone(self) -> str:
        return self._name("timezone")

    @property
    def freshness_warn(self) -> str:
        return self._name("freshness_warn")

    @property
    def freshness_fail(self) -> str:
        return self._name("freshness_fail")

    @property
    def left_out(self) -> str:
        """What a setting not given is called: an attribute is left out, a variable unset."""
        return "left out" if self.instance else "unset"

    @property
    def resources_written(self) -> str:
        return "as a list" if self.instance else "separated by commas"

    @property
    def resources_form(self) -> str:
        """How the resources setting is written, and what leaving it out does."""
        if self.instance:
            return "a list; left out, all are synced"
        return "comma-separated; unset syncs all"

    def resources_set_to(self, names: Sequence[str]) -> str:
        """The setting that syncs ``names``, as its reader would write it."""
        if self.instance:
            return f"{self.resources}: [{', '.join(names)}]"
        return f"{self.resources}={','.join(names)}"

    def deletions_set_to(self, mode: str) -> str:
        return f"{self.deletions}: {mode}" if self.instance else f"{self.deletions}={mode}"

    @property
    def row_count_max_drop(self) -> str | None:
        """The setting of the share a sync marks gone unconfirmed; a component instance has
        none (it keeps the default), so a message then names no setting."""
        return None if self.instance else "MKT_ROW_COUNT_MAX_DROP"

    @property
    def duckdb_wait(self) -> str | None:
        """The setting of how long a step waits for the DuckDB file; none for a component instance."""
        return None if self.instance else "MKT_DUCKDB_WAIT_SECONDS"

    @property
    def run_retry_delay(self) -> str | None:
        """The setting of how long after a failed run its retry starts; none for a component instance."""
        return None if self.instance else "MKT_RUN_RETRY_DELAY_SECONDS"

    @property
    def resume_window(self) -> str | None:
        """The setting of how long a failed read may be continued; none for a component instance."""
        return None if self.instance else "MKT_RESUME_HOURS"


# This project's own instance, and anything configured by the MKT_* variables.
ENVIRONMENT = SettingNames()
