"""Helpers shared by the tests of private directories and files."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ANOTHER_UID = 1001


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
