"""Worker turnover, sans I/O: how many workers to start, which to retire and when.

Rule 1: nothing here touches a process, a socket, a thread or a clock; the
supervisor passes in its table (anything with ``pid``, ``ready``,
``retired`` and ``started_at``) and carries out the plan.

Rule 2: a retiring worker takes no new request, answers those it has, and
exits; the pool never retires a worker while that would leave it with no
worker serving. Every planned retirement goes through :meth:`Turnover.plan`:

- *replacement* (a rolling restart, ``restart_workers()``/SIGHUP): the old
  worker retires once a new one is serving in its place, one at a time;
- *recycling* (``max_requests`` or ``max_worker_memory`` reached): the
  worker serves on and retires as soon as another worker serves (at once
  with a single worker: it must go), so even when every worker is past its
  limit they go one at a time;
- *resizing* down (``resize(n)``/SIGTTOU): starting workers are dropped
  first, then the oldest serving ones retire (they drain first)::

    replace(pid) ─▶ awaiting ─┬─ recycling: another worker serves ─▶ retire
                              └─ replacement: a new one serves ───▶ retire
    missing() ─▶ start (one at a time while replacements wait)
    plan()    ─▶ (retire, drop): surplus past ``wanted``, and awaiting ones
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple, Protocol


class Worker(Protocol):
    """What the turnover needs to know of a worker."""

    @property
    def pid(self) -> int:
        """The worker's id."""

    @property
    def ready(self) -> bool:
        """Whether it serves requests."""

    @property
    def retired(self) -> bool:
        """Whether it takes no more requests (it drains, then exits)."""

    @property
    def started_at(self) -> float:
        """When it was started (monotonic)."""


class Plan(NamedTuple):
    """What to do to the workers now."""

    retire: tuple[int, ...]
    """Serving workers to retire: no new request, drain, exit."""
    drop: tuple[int, ...]
    """Starting workers no longer wanted: kill them (they hold no request)."""


class Turnover:
    """The wanted worker count and the workers waiting to be replaced.

    Not thread-safe: the supervisor thread alone calls it.

    Args:
        wanted: how many workers to keep.
    """

    def __init__(self, wanted: int) -> None:
        self.wanted = wanted
        self._awaiting: dict[int, bool] = {}  # pid -> recycling (retire as soon as others serve)

    def resize(self, wanted: int) -> None:
        """Keep ``wanted`` workers from now on.

        Raises:
            ValueError: ``wanted`` is below 1.
        """
        if wanted < 1:
            raise ValueError(f"a pool needs at least 1 worker, not {wanted}")
        self.wanted = wanted

    def replace(self, pid: int, *, recycling: bool) -> None:
        """Retire ``pid`` once the rules allow; a replacement starts meanwhile."""
        self._awaiting.setdefault(pid, recycling)

    def forget(self, pid: int) -> None:
        """``pid`` is gone: nothing to replace any more."""
        self._awaiting.pop(pid, None)

    def awaiting(self) -> int:
        """How many workers wait to be retired."""
        return len(self._awaiting)

    def missing(self, workers: Iterable[Worker]) -> int:
        """How many workers to start now (before any back-off).

        Workers that are retiring or waiting to be replaced do not count; while
        some wait, new ones start one at a time.
        """
        staying = [w for w in workers if not w.retired and w.pid not in self._awaiting]
        missing = max(0, self.wanted - len(staying))
        if self._awaiting:
            missing = min(missing, 0 if any(not w.ready for w in staying) else 1)
        return missing

    def plan(self, workers: Sequence[Worker]) -> Plan:
        """The workers to retire and drop now."""
        staying = [w for w in workers if not w.retired and w.pid not in self._awaiting]
        excess = len(staying) - self.wanted
        starting = sorted((w for w in staying if not w.ready), key=_age, reverse=True)
        serving_staying = sorted((w for w in staying if w.ready), key=_age)
        drop = [w.pid for w in starting[: max(0, excess)]]
        retire = [w.pid for w in serving_staying[: max(0, excess - len(drop))]]
        serving = sum(w.ready and not w.retired for w in workers) - len(retire)
        ready = {w.pid for w in workers if w.ready and not w.retired}
        for pid, recycling in list(self._awaiting.items()):
            if pid not in ready:
                continue
            needed = min(1, self.wanted - 1) if recycling else self.wanted
            if serving - 1 >= needed:
                del self._awaiting[pid]
                retire.append(pid)
                serving -= 1
        return Plan(tuple(retire), tuple(drop))


def _age(worker: Worker) -> float:
    return worker.started_at
