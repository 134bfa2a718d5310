"""Process mode: ``handle_request`` on copies of the server in supervised worker processes.

Owns everything about worker processes in the parent; the worker side is
:mod:`mpreqrep._worker`, the framing :mod:`mpreqrep._channel`. It knows
nothing of client sockets: the I/O loop hands it request text and gets back
a future of the reply text. One concern per module:

- :mod:`._book`: sans-I/O bookkeeping: which request is on which worker,
  what to send again after a loss, deadlines, batching;
- :mod:`._process`: one worker process: spawn (loky's process context),
  kill (psutil), describe; :mod:`._greeter`: the handshake of its connections;
- :mod:`._supervisor`: the thread that keeps N processes alive, one at a
  time, gunicorn-style; :mod:`._table`: its table by pid and counters;
  :mod:`._loop`: its selector loop; :mod:`._starts`: the boot and failed
  starts, with :mod:`._backoff` (sans I/O); :mod:`._failures`: its own errors,
  survived or fatal;
- :mod:`._turnover` (sans I/O) and :mod:`._operations`: rolling restarts,
  recycling and resizing, one worker at a time; :mod:`._shutdown`: stopping;
- :mod:`._requests`: the book, the futures and the channels behind one lock;
  :mod:`._links`: which thread reads each worker's channel; :mod:`._expiry`:
  the timer of the request deadlines, on that same thread;
- :mod:`._dispatcher`: the thin :class:`~mpreqrep._dispatch.Dispatcher`;
- :mod:`._options`, :mod:`._errors`: ``workers="auto"``, range checks, errors.

Data crossing threads and processes::

    I/O thread ──frames──▶ worker process (x N) ──reply frames──▶ I/O thread
         │                     ▲        │ lifeline: EOF = the server died
         ▼                     │        ▼
    book (one lock) ◀── supervisor thread: spawn, greet, reap, kill, back off
"""

from ._dispatcher import ProcessPoolDispatcher
from ._errors import (
    HandlerTimeoutError,
    PoolFailedError,
    PoolStartError,
    WorkerCrashError,
    WorkerStartError,
)
from ._options import resolve_worker_count
from ._supervisor import kill_every_worker

__all__ = [
    "HandlerTimeoutError",
    "PoolFailedError",
    "PoolStartError",
    "ProcessPoolDispatcher",
    "WorkerCrashError",
    "WorkerStartError",
    "kill_every_worker",
    "resolve_worker_count",
]
