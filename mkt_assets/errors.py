"""Errors a user can act on: each names the resource, the request and what went wrong."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlencode

# The setting that names the DuckDB file, which errors about the file tell the user to change.
DUCKDB_PATH_ENV = "MKT_DUCKDB_PATH"


def describe_request(path: str, query: Mapping[str, object] | None = None) -> str:
    """``GET /api/contacts?limit=100&order=asc`` (the key travels in a header, never here)."""
    return f"GET {path}?{urlencode(query)}" if query else f"GET {path}"


class SyncError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigurationError(SyncError):
    """A setting is missing or invalid."""


class PrivateDirectoryError(ConfigurationError):
    """A directory meant for this user's files alone is not: another owner, open modes, a symlink."""


class PrivateFileError(PrivateDirectoryError):
    """A file in a private directory is not this user's alone, or is a symlink."""


class ApiError(SyncError):
    """A request to the API did not give a usable page."""

    def __init__(
        self, resource: str, path: str, query: Mapping[str, object] | None, problem: str
    ) -> None:
        self.resource = resource
        self.path = path
        self.query = dict(query or {})
        self.problem = problem
        super().__init__(f"{resource}: {describe_request(path, query)}: {problem}")


class ApiAuthError(ApiError):
    """401/403: the key was rejected. Retrying cannot help."""


class ApiStatusError(ApiError):
    """A non-2xx answer (after retries, for the retryable ones)."""

    def __init__(
        self,
        resource: str,
        path: str,
        query: Mapping[str, object] | None,
        status: int,
        problem: str,
    ) -> None:
        self.status = status
        super().__init__(resource, path, query, problem)


class ApiValidationError(ApiStatusError):
    """422: the API refused the request's parameters and said why."""

    def __init__(
        self,
        resource: str,
        path: str,
        query: Mapping[str, object] | None,
        violations: list[dict[str, object]],
        detail: str,
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
        )


class ApiConnectionError(ApiError):
    """The request never got a complete answer: refused, reset, timed out."""


class ApiResponseError(ApiError):
    """A 200 whose body is not a page of records as the API documents it."""


class PaginationError(ApiResponseError):
    """The cursor did not advance: following it would loop or skip records."""


class StagingError(SyncError):
    """Staged records could not be typed into their columns."""


class WarehouseBusyError(SyncError):
    """The DuckDB file stayed locked by a process that does not take our lock."""


class WarehouseWriteError(SyncError):
    """A write to the DuckDB file failed on a file (a full disk, a staged chunk gone): rolled back."""


class WarehouseFileError(ConfigurationError):
    """The DuckDB file cannot be used (not a DuckDB database, truncated, not writable, its lock
    or directory not writable): found before anything is fetched."""


class ForeignTableError(WarehouseFileError):
    """A table in the target schema bears one of the project's names, but the project did not
    create it: it is refused, never altered."""
