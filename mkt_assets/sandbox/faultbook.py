"""The active faults of one kind (API answers, webhook deliveries) and their counters."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar


class Countable(Protocol):
    """What the book needs of a fault: let ``after`` matches pass, then fire ``times`` (-1: forever)."""

    @property
    def times(self) -> int: ...

    @property
    def after(self) -> int: ...


F = TypeVar("F", bound=Countable)


class _Slot(Generic[F]):
    __slots__ = ("fault", "fired", "seen")

    def __init__(self, fault: F) -> None:
        self.fault, self.seen, self.fired = fault, 0, 0

    def exhausted(self) -> bool:
        return self.fault.times != -1 and self.fired >= self.fault.times


class FaultBook(Generic[F]):
    """The active faults and their counters.

    Every matching fault counts every matching occasion (so ``after=2`` always means the 3rd,
    whatever other faults do); when several are due at once the first in the list fires and the
    others keep their budget for later occasions. Deterministic: counts, never chance.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: list[_Slot[F]] = []

    def add(self, fault: F) -> None:
        with self._lock:
            self._slots.append(_Slot(fault))

    def replace(self, faults: Sequence[F]) -> None:
        with self._lock:
            self._slots = [_Slot(fault) for fault in faults]

    def snapshot(self) -> list[F]:
        with self._lock:
            return [slot.fault for slot in self._slots]

    def take(self, matches: Callable[[F], bool]) -> F | None:
        """The fault that fires on this occasion, if any (``matches``: the faults it concerns)."""
        with self._lock:
            chosen: _Slot[F] | None = None
            for slot in self._slots:
                if slot.exhausted() or not matches(slot.fault):
                    continue
                slot.seen += 1
                if chosen is None and slot.seen > slot.fault.after:
                    chosen = slot
            if chosen is None:
                return None
            chosen.fired += 1
            return chosen.fault
