"""Helpers shared by the tests of private directories and files."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ANOTHER_UID = 1001


def pytest_configure(config: pytest.Config) -> None:
    """A temporary directory of the session's own, for this process and every one it starts:
    the runs' default staging and quota areas (``<temp>/mkt_assets-<uid>``) then never mix with
    the user's, and the reads that failing runs keep for resuming go with the session."""
    session_temp = tempfile.mkdtemp(prefix="mkt_assets_tests_")
    os.chmod(session_temp, 0o755)  # a server run as another user (the Postgres tier) passes through
    config.stash[_SESSION_TEMP] = (session_temp, os.environ.get("TMPDIR"))
    os.environ["TMPDIR"] = session_temp
    tempfile.tempdir = None  # computed again, from TMPDIR


def pytest_unconfigure(config: pytest.Config) -> None:
    session_temp, previous = config.stash.get(_SESSION_TEMP, (None, None))
    if session_temp is None:
        return
    if previous is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = previous
    tempfile.tempdir = None
    shutil.rmtree(session_temp, ignore_errors=True)


_SESSION_TEMP = pytest.StashKey[tuple[str, str | None]]()


@pytest.fixture()
def give_away(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path], int]:
    """Make ``path`` another user's; the uid it now belongs to.

    As root (here and in CI) it is chowned; otherwise, where no chown to another user is
    possible, the test takes another uid instead, so the path's real owner is someone else.
    """

    def give(path: Path) -> int:
        if os.getuid() == 0:
            os.chown(path, ANOTHER_UID, -1, follow_symlinks=False)
            return ANOTHER_UID
        real = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: real + 1)
        return real

    return give


@pytest.fixture()
def usual_umask() -> Iterator[None]:
    """Run the test under umask 022, the usual one, which leaves new files readable by all."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


# ---------------------------------------------------------------- materializing marketing assets

import dagster as dg  # noqa: E402

from mkt_assets.orchestration.assets import DEFAULT_NAMES, build_marketing_assets  # noqa: E402
from mkt_assets.orchestration.settings import Settings  # noqa: E402

MARKETING_ASSETS = build_marketing_assets(Settings())


def marketing_key(name: str) -> dg.AssetKey:
    return DEFAULT_NAMES.asset_key(name)


def materialize_marketing(
    names: list[str],
    resources: dict[str, object],
    *,
    settings: Settings | None = None,
    instance: dg.DagsterInstance | None = None,
    also: list[dg.AssetsDefinition] | None = None,
    raise_on_error: bool = True,
    run_config: dict[str, Any] | None = None,
) -> dg.ExecuteInProcessResult:
    """Materialize the named marketing assets (and ``also``), as "Materialize" in the UI does."""
    assets = build_marketing_assets(settings) if settings is not None else MARKETING_ASSETS
    extra = also or []
    return dg.materialize(
        [assets, *extra],
        selection=[marketing_key(name) for name in names] + [asset.key for asset in extra],
        resources=resources,
        instance=instance,
        raise_on_error=raise_on_error,
        run_config=run_config,
    )


def materialization(result: dg.ExecuteInProcessResult, name: str) -> dict[str, object]:
    """The metadata of the one materialization of ``marketing/<name>`` in ``result``."""
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key == marketing_key(name)]
    return {key: value.value for key, value in event.materialization.metadata.items()}
