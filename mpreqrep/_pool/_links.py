"""The ready workers' channels, and the thread that reads each one (its host).

A channel is read by one host for as long as it is read: the supervisor's
loop (*home*) until the I/O loop attaches, the I/O loop from then on, and
home again if the I/O loop ends first at shutdown (:meth:`Links.rehost`).
Every step on a channel (settling its replies, closing it, settling its
loss) runs on its host's thread, so a reply never changes thread; the timer
of the request deadlines moves with the channels, so a timeout fails its
request on that thread too::

    add(worker)     ─▶ requests.join, the host reads its channel
    readable        ─▶ requests.settle ─▶ settled(worker, replies)
                       (a retired worker with nothing left: close its channel)
    end of stream / gone(worker) ─▶ drain, requests.lose: its running request
                       fails, the rest go to other workers
    retire / release ─▶ close the channel once idle: the worker exits
    take_back()     ─▶ the I/O loop has ended: rehost(home)
    rehost(host)    ─▶ each channel and the deadline timer move to host

Knows nothing of processes beyond a worker's pid and ``kill``, nor of the
supervisor's table.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

from .._channel import Channel
from .._dispatch import LoopHooks
from ._process import WorkerProcess
from ._requests import Replies, Requests

logger = logging.getLogger("mpreqrep")

Settled = Callable[[WorkerProcess, Replies], None]


@dataclass(eq=False)
class _Link:
    """A ready worker's channel and the thread that reads it (``host``)."""

    worker: WorkerProcess
    channel: Channel
    host: LoopHooks
    lost: bool = False


class Links:
    """Hosts the channels of the ready workers.

    Args:
        requests: the requests and the book.
        home: the supervisor's loop, the host until the I/O loop attaches.
        settled: told of each batch of a worker's replies (on its host).

    Thread safety: every public method runs on the supervisor thread; the
    steps they schedule run on each channel's host.
    """

    def __init__(self, requests: Requests, home: LoopHooks, settled: Settled) -> None:
        self._requests = requests
        self._home = home
        self._settled = settled
        self._links: dict[int, _Link] = {}
        self._host = home

    def add(self, worker: WorkerProcess) -> None:
        """A worker said hello: host its channel and give it requests."""
        assert worker.channel is not None, "a ready worker has a channel"
        link = self._links[worker.pid] = _Link(worker, worker.channel, self._host)
        self._requests.join(worker.pid, worker.channel)
        self._add_reader(link)

    def gone(self, worker: WorkerProcess) -> None:
        """A ready worker's process ended: on its channel's host, settle what it had."""
        link = self._links.pop(worker.pid, None)
        if link is not None:
            self._on_host(link, functools.partial(self._end_link, link, drain=True))

    def retire(self, worker: WorkerProcess) -> None:
        """Send a worker no more requests; close its channel once it is idle."""
        link = self._links.get(worker.pid)
        if link is not None and self._requests.retire(worker.pid):
            self._on_host(link, functools.partial(self._close_channel, link))

    def release(self) -> None:
        """Close every channel on its host: the workers exit."""
        for link in list(self._links.values()):
            self._on_host(link, functools.partial(self._close_channel, link))

    def take_back(self) -> None:
        """Host the channels at home again if their host has ended (stopping)."""
        if self._host is not self._home and not self._host.call_soon(lambda: None):
            self.rehost(self._home)

    def rehost(self, host: LoopHooks) -> None:
        """Move every channel, and the deadline timer, to ``host``; the old host no
        longer reads them."""
        old, self._host = self._host, host
        self._requests.rehost(host)
        for link in self._links.values():
            if link.lost:  # its end of stream came; its process is not reaped yet
                continue
            if old is self._home:
                self._home.remove_reader(link.channel)
            link.host = host
            if not link.channel.closed:  # a retired worker's: nothing more to read
                self._add_reader(link)

    # -- the host's side (the thread that reads a channel) ------------------------------------

    def _on_readable(self, link: _Link) -> None:
        """A worker sent replies, or its channel ended."""
        if link.lost:
            return
        try:
            payloads = link.channel.receive()
            if payloads is None:  # the worker is gone; its process is reaped soon
                self._end_link(link, drain=False)
            else:
                self._settle(link, payloads)
        except Exception:
            logger.exception("reading worker %d's replies failed; replacing it", link.worker.pid)
            self._end_link(link, drain=False)

    def _settle(self, link: _Link, payloads: list[bytes]) -> None:
        """Settle a worker's replies; close its channel once it retired and is idle."""
        replies = self._requests.settle(link.worker.pid, payloads)
        self._settled(link.worker, replies)
        if replies.retired:
            self._close_channel(link)

    def _end_link(self, link: _Link, *, drain: bool) -> None:
        """The worker is gone: read what it sent, fail its running request, resend the rest."""
        while drain and not link.lost and (payloads := link.channel.receive()):
            self._settle(link, payloads)
        if link.lost:
            return
        link.lost = True
        link.host.remove_reader(link.channel)
        self._requests.lose(link.worker.pid)
        if not drain:  # the end of stream came first: make sure the process ends too
            self._home.call_soon(lambda: link.worker.kill("crashed"))

    def _close_channel(self, link: _Link) -> None:
        """Stop reading a channel and close it: its worker exits (host thread)."""
        link.host.remove_reader(link.channel)
        self._requests.close(link.channel)

    # -- helpers ---------------------------------------------------------------------------

    def _add_reader(self, link: _Link) -> None:
        """Have the link's host read its channel (supervisor thread)."""
        reader = functools.partial(self._on_readable, link)
        host = link.host
        if host is self._home:
            host.add_reader(link.channel, reader)
            return

        def watch() -> None:
            if not (link.lost or link.channel.closed):
                host.add_reader(link.channel, reader)

        host.call_soon(watch)  # a loop that has ended hands the links back (rehost)

    def _on_host(self, link: _Link, step: Callable[[], None]) -> None:
        """Run ``step`` on the thread that reads the link (now, if that is this one)."""
        if link.host is self._home or not link.host.call_soon(step):
            step()
