"""Errors a user can act on: each names the resource, the request and what went wrong."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

from mkt_assets.core.setting_names import ENVIRONMENT, SettingNames

# The setting that names the DuckDB file, which errors about the file tell the user to change.
DUCKDB_PATH_ENV = "MKT_DUCKDB_PATH"
# The DuckDB file as a message names it: for the project's own account and for a component instance.
DATABASE_SETTING = f"{DUCKDB_PATH_ENV} (a component instance: its database)"
# The setting holding the API key: named in errors, and kept from every child process.
API_KEY_ENV = "MKT_API_KEY"


def describe_request(path: str, query: Mapping[str, object] | None = None, method: str = "GET") -> str:
    """``GET /api/contacts?limit=100&order=asc`` (the key travels in a header, never here; a
    request's body, which may hold a secret, is never described)."""
    return f"{method} {path}?{urlencode(query)}" if query else f"{method} {path}"


class SyncError(Exception):
    """Base of every error this project raises on purpose."""

    # Whether the same sync, run again a while later, may succeed (an outage ends, a lock is let
    # go), or would fail the same way until someone acts (a key, a setting, a record): Dagster's
    # run retries skip the latter (see ``run_retries``). Each type says which.
    retriable: bool = False


def is_retriable(error: BaseException) -> bool:
    """Whether running the sync again later may mend ``error``. What the project does not raise
    on purpose (a crash, a killed worker, an interrupt) may well pass, as Dagster assumes."""
    return error.retriable if isinstance(error, SyncError) else True


class ConfigurationError(SyncError):
    """A setting is missing or invalid."""


class PrivateDirectoryError(ConfigurationError):
    """A directory meant for this user's files alone is not: another owner, open modes, a symlink."""


class PrivateFileError(PrivateDirectoryError):
    """A file in a private directory is not this user's alone, or is a symlink."""


class ApiError(SyncError):
    """A request to the API did not give a usable page."""

    def __init__(
        self, resource: str, path: str, query: Mapping[str, object] | None, problem: str, *, method: str = "GET"
    ) -> None:
        self.resource = resource
        self.path = path
        self.query = dict(query or {})
        self.problem = problem
        self.method = method
        super().__init__(f"{resource}: {describe_request(path, query, method)}: {problem}")


class ApiAuthError(ApiError):
    """401: the key was rejected. Retrying cannot help."""


class ApiStatusError(ApiError):
    """A non-2xx answer (after retries, for the retryable ones)."""

    def __init__(
        self,
        resource: str,
        path: str,
        query: Mapping[str, object] | None,
        status: int,
        problem: str,
        *,
        method: str = "GET",
    ) -> None:
        self.status = status
        # 429 and 5xx fail a run only once the transport's own retries are spent: an overloaded
        # or unavailable API, which passes. Any other status answers a retry the same way.
        self.retriable = status == 429 or status >= 500
        super().__init__(resource, path, query, problem, method=method)


class ApiAccessError(ApiStatusError):
    """403/404: the account cannot read this resource (its plan does not include it, or the API
    does not serve it), or, when every resource answers 404, the base URL is wrong. Retrying
    cannot help; leaving it out, or setting the base URL, can."""

    def __init__(
        self,
        resource: str,
        path: str,
        query: Mapping[str, object] | None,
        status: int,
        problem: str,
        *,
        base_url: str = "",
        settings: SettingNames = ENVIRONMENT,
    ) -> None:
        # What a run that every resource failed this way says instead (``sync.FetchFailed``),
        # naming the settings as its reader sets them.
        self.base_url, self.settings = base_url, settings
        super().__init__(resource, path, query, status, problem)


class ApiValidationError(ApiStatusError):
    """422: the API refused the request's parameters and said why."""

    def __init__(
        self,
        resource: str,
        path: str,
        query: Mapping[str, object] | None,
        violations: list[dict[str, object]],
        detail: str,
        *,
        method: str = "GET",
    ) -> None:
        self.violations = violations
        listed = "; ".join(
            f"{violation.get('propertyPath', '?')}: {violation.get('message', '?')}"
            for violation in violations
        )
        super().__init__(
            resource,
            path,
            query,
            422,
            f"HTTP 422, the API rejected the request: {listed or detail or 'no details given'}",
            method=method,
        )


class ApiConnectionError(ApiError):
    """The request never got a complete answer: refused, reset, timed out."""

    retriable = True


class ApiResponseError(ApiError):
    """A 200 whose body is not a page of records as the API documents it."""


class PaginationError(ApiResponseError):
    """The cursor did not advance: following it would loop or skip records."""


class StagingError(SyncError):
    """Staged records could not be typed into their columns."""


class WarehouseBusyError(SyncError):
    """The DuckDB file stayed locked by a process that does not take our lock."""

    retriable = True  # the session holding it may close


class WarehouseWriteError(SyncError):
    """A write to the DuckDB file failed on a file (a full disk, a staged chunk gone): rolled back."""

    retriable = True  # space may be freed; a retry stages its pages anew


@dataclass(frozen=True)
class MassDeletion:
    """What one table's complete read would take away: refused, unless the run confirms it."""

    table: str  # schema.table
    listed: int  # records the complete read listed
    gone: int  # live rows it lacks
    live: int  # live rows the table held
    deletions: str  # mark or delete

    def __str__(self) -> str:
        return self.describe(ENVIRONMENT)

    def describe(self, settings: SettingNames) -> str:
        fate = f"remove them ({settings.deletions_set_to('delete')})" if self.deletions == "delete" else "mark them deleted"
        lacks = (
            f"all {self.live} of the table's live rows"
            if self.gone >= self.live
            else f"{self.gone} of the table's {self.live} live rows ({self.gone / self.live:.1%})"
        )
        return f"{self.table}: the API's complete list ({self.listed} records) lacks {lacks}; the sync would {fate}"


class MassDeletionError(SyncError):
    """A complete read would mark (or remove) more of a table's live rows than a sync does
    unconfirmed: an API answering an empty or short list in an outage looks the same. The
    run's transaction is rolled back, so every table stays as it was."""

    def __init__(self, refused: tuple[MassDeletion, ...], max_drop: float, allowance: int) -> None:
        self.refused, self.max_drop, self.allowance = tuple(refused), max_drop, allowance
        super().__init__(self.describe(ENVIRONMENT))

    def describe(self, settings: SettingNames) -> str:
        """The message, naming the settings as ``settings`` says its reader sets them."""
        lines = [deletion.describe(settings) for deletion in self.refused]
        share = settings.row_count_max_drop
        lines.append(
            f"A sync marks gone, unconfirmed, at most {self.max_drop * 100:g}% of a table's live rows"
            f"{f' ({share})' if share else ''} or {self.allowance} rows, whichever is more, and never every row it"
            " holds: an API answering an empty or short list during an outage would look just like this."
            " Nothing was written: every table is as it was."
        )
        return "\n".join(lines)

    def __reduce__(self) -> tuple[type[MassDeletionError], tuple[tuple[MassDeletion, ...], float, int]]:
        # Crosses from the lean worker pickled: rebuilt from its parts, not from the message.
        return type(self), (self.refused, self.max_drop, self.allowance)


class WarehouseFileError(ConfigurationError):
    """The DuckDB file cannot be used (not a DuckDB database, truncated, not writable, its lock
    or directory not writable): found before anything is fetched."""


class InboxError(ConfigurationError):
    """The webhook inbox's file cannot be used (not private, a symlink, not an inbox, not a
    SQLite database): found when it is opened, naming the file and what to do."""


class InboxUnavailableError(SyncError):
    """The webhook inbox could not be read or written just now (a full disk, an I/O error)."""

    retriable = True


class InboxBusyError(InboxUnavailableError):
    """The webhook inbox stayed locked by another process for longer than the bounded wait."""


class ForeignTableError(WarehouseFileError):
    """A table in the target schema bears one of the project's names, but the project did not
    create it: it is refused, never altered."""
