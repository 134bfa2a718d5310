"""The ``mpreqrep`` command line: ``serve`` a server class, send a ``request``.

Uses only the public API. Owns argument parsing, importing the user's
``MODULE:CLASS``, logging set-up, signal handling and exit codes; knows
nothing of sockets, framing or pools. Bad input becomes one line on stderr
and a non-zero exit code, never a traceback.

``serve`` starts the server from a runner thread and waits in the main thread,
asleep in select() (see :mod:`mpreqrep._signals`) until something happens::

    signals ─(wake-up fd)─▶ socketpair ◀─ notify() ─ runner: server.start() returned
                               │                     (serving), server ended
    main thread: SignalWaiter.wait(until the next stats line is due)
        timeout ─▶ one stats line
        SIGHUP/SIGTTIN/SIGTTOU ─▶ operate(); queued until the server serves
        SIGINT/SIGTERM ─▶ server.stop(); wait for the end (drains) ─▶ exit 0
        the server ended by itself ─▶ exit 0, or 1 if it failed
        2nd SIGINT/SIGTERM (in the Python handler) ─▶ terminate workers, exit 128 + signum
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import math
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from decimal import Decimal
from types import ModuleType
from typing import Any, NoReturn, TypeVar

from . import (
    NoServerError,
    ReplyTooLargeError,
    RequestServer,
    __version__,
    dask_executor,
    do_request,
    split_address,
)
from ._channel import remove_socket_directories
from ._signals import OPERATION_SIGNALS, SHUTDOWN_SIGNALS, SignalWaiter

logger = logging.getLogger("mpreqrep")

_Number = TypeVar("_Number", int, float)

PROG = "mpreqrep"
DEFAULT_ADDRESS = "localhost:mpreqrep"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
TRACEBACK_HINT = " (--log-level DEBUG logs the traceback)"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NO_SERVER = 3
EXIT_TIMEOUT = 4
EXIT_EMPTY_REPLY = 5
EXIT_SIGNAL_BASE = 128

SIZE_MULTIPLIERS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_SIZE_PATTERN = re.compile(r"(\d+(?:\.\d*)?)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)
DEFAULT_GRACEFUL_TIMEOUT_S = 30.0
EXIT_MARGIN_S = 2.0
"""Seconds past the graceful timeout after which ``serve`` exits even if the server
has not stopped (a thread-mode handler cannot be killed)."""


class CliError(Exception):
    """A problem reported as one line on stderr, ending the command.

    Args:
        message: what went wrong, on one line.
        exit_code: the process exit code to return.
    """

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class _ArgumentParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, not usage plus error."""

    def error(self, message: str) -> NoReturn:
        """Raise :class:`CliError` instead of printing usage and exiting."""
        raise CliError(f"{message} (see '{self.prog} --help')")


def main(argv: list[str] | None = None) -> int:
    """Run the ``mpreqrep`` command line.

    Args:
        argv: the arguments after the program name; ``sys.argv[1:]`` if
            ``None``.

    Returns:
        The exit code: 0 success, 1 the server failed, 2 bad usage, 3 no
        server listening, 4 timeout, 5 empty reply, 130 interrupted
        (see the ``EXIT_*`` constants).
    """
    try:
        args = _build_parser().parse_args(argv)
        command: Callable[[argparse.Namespace], int] = args.command
        return command(args)
    except CliError as exc:
        print(f"{PROG}: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_SIGNAL_BASE + signal.SIGINT


# -- parsing ------------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    """The parser with its ``serve`` and ``request`` subcommands."""
    parser = _ArgumentParser(
        prog=PROG, description="Serve and query yoton-compatible request-reply servers."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_serve_command(commands)
    _add_request_command(commands)
    return parser


def _add_serve_command(commands: argparse._SubParsersAction[_ArgumentParser]) -> None:
    """Define ``mpreqrep serve MODULE:CLASS [options]``."""
    serve = commands.add_parser(
        "serve",
        help="serve a RequestServer subclass until SIGINT or SIGTERM",
        description="Serve MODULE:CLASS, a RequestServer subclass imported with the "
        "current directory on sys.path. SIGINT or SIGTERM drains in-flight requests "
        "and exits 0; a second signal exits at once.",
    )
    serve.add_argument("target", metavar="MODULE:CLASS", help="e.g. workers.primes:PrimeServer")
    serve.add_argument(
        "--address",
        type=address_argument,
        default=DEFAULT_ADDRESS,
        help="[tcp://]host:port to listen at; port 0 picks a free one "
        f"(default: {DEFAULT_ADDRESS})",
    )
    placement = serve.add_mutually_exclusive_group()
    placement.add_argument(
        "--workers",
        type=worker_count_argument,
        metavar="N|auto",
        help="run handlers on a pool of N processes ('auto': one per physical core); "
        "default: thread mode",
    )
    placement.add_argument(
        "--dask",
        metavar="SCHEDULER",
        help="run handlers on the Dask cluster whose scheduler is at SCHEDULER "
        "(e.g. tcp://10.0.0.5:8786; needs mpreqrep[dask])",
    )
    serve.add_argument(
        "--async",
        dest="async_val",
        action="store_true",
        help="thread mode: run handlers concurrently on threads",
    )
    serve.add_argument(
        "--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO", help="default: INFO"
    )
    _add_value_options(serve, SERVE_OPTIONS)
    _add_value_options(serve, OPERATIONS_OPTIONS)
    serve.set_defaults(command=_serve)


def _add_value_options(parser: argparse.ArgumentParser, options: Sequence[ValueOption]) -> None:
    """Add options that take one value and default to ``None``."""
    for flag, parse, metavar, text in options:
        parser.add_argument(flag, type=parse, metavar=metavar, help=text)


def _add_request_command(commands: argparse._SubParsersAction[_ArgumentParser]) -> None:
    """Define ``mpreqrep request ADDRESS TEXT [--timeout S]``."""
    request = commands.add_parser(
        "request",
        help="send one request and print the reply",
        description="Send TEXT to the server at ADDRESS and print its reply. Exit codes: "
        f"{EXIT_NO_SERVER} no server listening, {EXIT_TIMEOUT} no reply within the "
        f"timeout, {EXIT_EMPTY_REPLY} connection closed without a reply.",
    )
    request.add_argument("address", type=address_argument, metavar="ADDRESS")
    request.add_argument("text", metavar="TEXT", help="the request; CRLF is appended")
    request.add_argument(
        "--timeout",
        type=positive_seconds_argument,
        metavar="S",
        help="give up after S seconds (default: wait as long as it takes)",
    )
    request.add_argument(
        "--max-reply-size",
        type=size_argument,
        metavar="SIZE",
        help="give up on a reply longer than SIZE without a line end (bytes, or e.g. "
        "512M, 2G; default: 1G)",
    )
    request.set_defaults(command=_request)


def address_argument(text: str) -> str:
    """Check an address with :func:`split_address`; return it unchanged.

    Raises:
        argparse.ArgumentTypeError: the address is malformed, or its
            protocol is not tcp.
    """
    _split_tcp_address(text, "only tcp is served")
    return text


def metrics_address_argument(text: str) -> tuple[str, int]:
    """Parse ``--metrics HOST:PORT`` (``[::1]:9100`` for IPv6) into ``(host, port)``.

    Raises:
        argparse.ArgumentTypeError: a malformed address.
    """
    return _split_tcp_address(text, "metrics are served over http")


def _split_tcp_address(text: str, not_tcp: str) -> tuple[str, int]:
    """``(host, port)`` of a tcp address; ``not_tcp`` says why another protocol is refused.

    Raises:
        argparse.ArgumentTypeError: a malformed address, or not tcp.
    """
    try:
        protocol, host, port = split_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid address {text!r}: {exc}") from exc
    if protocol != "tcp":
        raise argparse.ArgumentTypeError(f"invalid address {text!r}: {not_tcp}")
    return host, port


def _number_argument(
    convert: Callable[[str], _Number], accept: Callable[[_Number], bool], expected: str
) -> Callable[[str], _Number]:
    """An argparse ``type``: ``convert(text)`` where ``accept`` takes the result.

    Args:
        convert: ``int`` or ``float``.
        accept: whether a converted value is allowed.
        expected: what is, for the error (``"a positive integer"``).

    Returns:
        The parser, which raises :class:`argparse.ArgumentTypeError` for
        anything else.
    """

    def parse(text: str) -> _Number:
        with contextlib.suppress(ValueError):
            value = convert(text)
            if accept(value):
                return value
        raise argparse.ArgumentTypeError(f"expected {expected}, not {text!r}")

    return parse


positive_int_argument = _number_argument(int, lambda n: n >= 1, "a positive integer")
natural_int_argument = _number_argument(int, lambda n: n >= 0, "an integer of at least 0")
positive_seconds_argument = _number_argument(
    float, lambda s: s > 0, "a positive number of seconds"
)  # NaN is not above zero: refused
_worker_count = _number_argument(int, lambda n: n >= 1, "a positive integer or 'auto'")


def worker_count_argument(text: str) -> int | str:
    """Parse ``--workers``: ``"auto"`` or an integer of at least 1.

    Raises:
        argparse.ArgumentTypeError: anything else.
    """
    return "auto" if text.lower() == "auto" else _worker_count(text)


def size_argument(text: str) -> int:
    """Parse a byte size: ``1048576``, ``512K``, ``512M``, ``2G``, ``1.5GiB``.

    The suffixes K, M, G and T are powers of 1024, in either case; a
    trailing ``B`` or ``iB`` is allowed.

    Raises:
        argparse.ArgumentTypeError: not a size, or zero.
    """
    match = _SIZE_PATTERN.fullmatch(text.strip())
    size = 0
    if match:
        number, unit = match.groups()
        size = int(Decimal(number) * SIZE_MULTIPLIERS[unit.upper()])
    if size < 1:
        raise argparse.ArgumentTypeError(
            f"expected a size such as 512M, 2G or a number of bytes, not {text!r}"
        )
    return size


ValueOption = tuple[str, Callable[[str], Any], str, str]
"""An option that takes a value: its flag, parser, metavar and help."""

SERVE_OPTIONS: tuple[ValueOption, ...] = (
    (
        "--request-timeout",
        positive_seconds_argument,
        "S",
        "drop a request whose handler runs longer than S seconds",
    ),
    (
        "--max-worker-memory",
        size_argument,
        "SIZE",
        "recycle a worker whose memory exceeds SIZE (bytes, or e.g. 512M, 2G)",
    ),
    (
        "--stats-interval",
        positive_seconds_argument,
        "S",
        "log a one-line stats summary every S seconds",
    ),
)
OPERATIONS_OPTIONS: tuple[ValueOption, ...] = (
    (
        "--metrics",
        metrics_address_argument,
        "HOST:PORT",
        "serve Prometheus metrics at http://HOST:PORT/metrics (needs mpreqrep[metrics])",
    ),
    (
        "--graceful-timeout",
        positive_seconds_argument,
        "S",
        "on SIGINT/SIGTERM, give in-flight requests S seconds, then kill the workers "
        "still running them and exit (default: 30)",
    ),
    (
        "--max-requests",
        positive_int_argument,
        "N",
        "process mode: recycle a worker after N requests",
    ),
    (
        "--max-requests-jitter",
        natural_int_argument,
        "J",
        "process mode: each worker recycles after N + randint(0, J) requests",
    ),
)
"""The options of operating a server in production (README, "Operations")."""
PROCESS_MODE_OPTIONS = ("--max-worker-memory", "--max-requests", "--max-requests-jitter")
"""Options that only process mode (``--workers``) can carry out."""


# -- request ------------------------------------------------------------------------------


def _request(args: argparse.Namespace) -> int:
    """Send one request, print the reply without its CRLF, and map failures to exit codes."""
    limit = {} if args.max_reply_size is None else {"max_reply_size": args.max_reply_size}
    try:
        reply = do_request(args.address, args.text, timeout=args.timeout, **limit)
    except NoServerError as exc:
        raise CliError(f"no server is listening at {args.address}", EXIT_NO_SERVER) from exc
    except ReplyTooLargeError as exc:
        raise CliError(f"{args.address} sent too long a reply: {exc}", EXIT_ERROR) from exc
    if reply is None:
        raise CliError(f"no reply from {args.address} within {args.timeout} s", EXIT_TIMEOUT)
    if not reply:
        raise CliError(f"{args.address} closed the connection without replying", EXIT_EMPTY_REPLY)
    if not print_line(reply.removesuffix("\r\n")):
        raise CliError("cannot print the reply: stdout is closed", EXIT_ERROR)
    return EXIT_OK


def print_line(text: str) -> bool:
    """Print ``text`` on stdout; ``False`` if stdout is closed or broken (a reader that
    went away: ``EPIPE``), when the line is lost. stdout is then pointed at the null
    device, as the ``signal`` module's docs advise, so flushing it at exit fails no more.
    """
    try:
        print(text, flush=True)
    except (OSError, ValueError):  # ValueError: the file object itself was closed
        with contextlib.suppress(OSError, ValueError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, sys.stdout.fileno())
            os.close(null)
        return False
    return True


def announce(line: str) -> None:
    """Print a line of ``serve``'s; if stdout is closed, log that it is lost and serve on."""
    if not print_line(line):
        logger.warning("stdout is closed: %r is lost; serving on", line)


# -- serve --------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    """Import the server class, bind, announce the address, and serve until a signal.

    The signals are handled from before the address is announced, so an
    operator may signal as soon as that line is out.
    """
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT)
    check_mode_options(args)
    server_class = load_server_class(args.target)
    signals = SignalWaiter((*SHUTDOWN_SIGNALS, *OPERATION_SIGNALS), _exit_on_second_shutdown())
    with signals, _executor_for(args) as executor:
        server = _create_server(server_class, args, executor)
        announce(f"{PROG}: serving {args.target} at {server.address}")
        with _metrics_endpoint(server, args.metrics):
            supervisor = _Supervisor(
                server,
                signals,
                stats_interval_s=args.stats_interval,
                graceful_timeout_s=args.graceful_timeout or DEFAULT_GRACEFUL_TIMEOUT_S,
            )
            return supervisor.serve_until_stopped()


def _exit_on_second_shutdown() -> Callable[[int], None]:
    """A signal callback that exits at once on the second SIGINT or SIGTERM (the
    first one drains). It runs in the Python handler, so even while the main
    thread is busy elsewhere."""
    seen: list[int] = []

    def on_signal(signum: int) -> None:
        if signum in SHUTDOWN_SIGNALS:
            if seen:
                _exit_now(signum)
            seen.append(signum)

    return on_signal


@contextlib.contextmanager
def _metrics_endpoint(server: RequestServer, address: tuple[str, int] | None) -> Iterator[None]:
    """Serve ``/metrics`` for ``server`` while the block runs, if ``--metrics`` asks."""
    if address is None:
        yield
        return
    from ._metrics import start_metrics_server

    host, port = address
    try:
        http_server, bound_port = start_metrics_server(server, host, port)
    except (ImportError, OSError) as exc:
        message = f"cannot serve metrics at {host}:{port}: {_one_line(exc)}"
        raise CliError(message, EXIT_ERROR) from exc
    shown = f"[{host}]" if ":" in host else host
    announce(f"{PROG}: metrics at http://{shown}:{bound_port}/metrics")
    try:
        yield
    finally:
        http_server.shutdown()
        http_server.server_close()


@contextlib.contextmanager
def _executor_for(args: argparse.Namespace) -> Iterator[Executor | None]:
    """The Dask executor ``--dask`` asks for (closed afterwards), else ``None``."""
    if args.dask is None:
        yield None
        return
    try:
        executor = dask_executor(args.dask)
    except (ImportError, OSError, ValueError) as exc:
        raise CliError(f"cannot use the Dask scheduler at {args.dask}: {_one_line(exc)}") from exc
    with executor:
        yield executor


def check_mode_options(args: argparse.Namespace) -> None:
    """Refuse options of another mode than the one chosen, rather than ignore them.

    Raises:
        CliError: ``--async`` with ``--workers`` or ``--dask``, or an option of
            process mode without ``--workers``.
    """
    if args.async_val and (args.workers is not None or args.dask is not None):
        raise CliError("--async is for thread mode: not with --workers or --dask")
    if args.workers is not None:
        return
    for flag in PROCESS_MODE_OPTIONS:
        if getattr(args, flag.removeprefix("--").replace("-", "_")) is not None:
            raise CliError(f"{flag} is for process mode: give --workers too")


def load_server_class(target: str) -> type[RequestServer]:
    """Import ``MODULE:CLASS`` with the current directory on ``sys.path``.

    Args:
        target: ``"package.module:ClassName"``.

    Returns:
        The class, a :class:`RequestServer` subclass.

    Raises:
        CliError: a malformed target, a module that fails to import, a
            missing name, or a name that is not a ``RequestServer`` subclass.
    """
    module_name, _, class_name = target.partition(":")
    if not module_name or not class_name:
        raise CliError(f"expected MODULE:CLASS such as workers.echo:EchoServer, not {target!r}")
    module = _import_module(module_name)
    if not hasattr(module, class_name):
        raise CliError(f"module {module_name!r} has no attribute {class_name!r}")
    server_class = getattr(module, class_name)
    if not (isinstance(server_class, type) and issubclass(server_class, RequestServer)):
        raise CliError(f"{target!r} is not a RequestServer subclass")
    return server_class


def _import_module(name: str) -> ModuleType:
    """Import a module as gunicorn does, from the current directory first."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except (Exception, SystemExit) as exc:  # a module that calls sys.exit() as it loads
        logger.debug("importing %r failed", name, exc_info=True)
        hint = "" if isinstance(exc, ImportError) else TRACEBACK_HINT
        raise CliError(f"cannot import module {name!r}: {_one_line(exc)}{hint}") from exc


def _create_server(
    server_class: type[RequestServer], args: argparse.Namespace, executor: Executor | None
) -> RequestServer:
    """Build the server, passing only the options given, so narrower subclasses work."""
    options: dict[str, Any] = {
        "workers": args.workers,
        "executor": executor,
        "request_timeout": args.request_timeout,
        "max_worker_memory": args.max_worker_memory,
        "graceful_timeout": args.graceful_timeout,
        "max_requests": args.max_requests,
        "max_requests_jitter": args.max_requests_jitter,
    }
    if args.async_val:
        options["async_val"] = True
    try:
        return server_class(
            args.address, **{key: value for key, value in options.items() if value is not None}
        )
    except OSError as exc:
        raise CliError(f"cannot listen at {args.address}: {_one_line(exc)}", EXIT_ERROR) from exc
    except (TypeError, ValueError) as exc:
        raise CliError(f"cannot create {args.target}: {_one_line(exc)}") from exc
    except Exception as exc:  # the class's own __init__ failed
        logger.debug("creating %s failed", args.target, exc_info=True)
        message = f"cannot create {args.target}: {_one_line(exc)}{TRACEBACK_HINT}"
        raise CliError(message, EXIT_ERROR) from exc


def _one_line(exc: BaseException) -> str:
    """``"Type: message"`` on a single line."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


class _Supervisor:
    """Serves in a runner thread; turns signals into operations, a drain or a forced exit.

    The main thread sleeps in :meth:`SignalWaiter.wait` until a signal comes,
    the runner reports that the server serves or ended, or a stats line is due.

    Args:
        server: a bound server that has not been started.
        signals: the entered waiter of the shutdown and operation signals.
        stats_interval_s: seconds between stats lines; ``None`` for none.
        graceful_timeout_s: how long stopping may take before ``serve`` gives
            up (plus :data:`EXIT_MARGIN_S`).
    """

    def __init__(
        self,
        server: RequestServer,
        signals: SignalWaiter,
        *,
        stats_interval_s: float | None,
        graceful_timeout_s: float = DEFAULT_GRACEFUL_TIMEOUT_S,
    ) -> None:
        self._server = server
        self._signals = signals
        self._stats_interval_s = stats_interval_s
        self._graceful_timeout_s = graceful_timeout_s
        self._serving = threading.Event()
        self._ended = threading.Event()
        self._failure: BaseException | None = None

    def serve_until_stopped(self) -> int:
        """Serve until a shutdown signal or the server's own end, then drain.

        Returns:
            ``EXIT_OK`` once the server has stopped and drained.

        Raises:
            CliError: the server failed (``EXIT_ERROR``).
        """
        runner = threading.Thread(target=self._run_server, name="mpreqrep-cli-server")
        with failures_of(self._server, self._record_failure):
            runner.start()
            signum = self._wait_for_shutdown()
            if signum is not None:
                logger.info(
                    "received %s: draining in-flight requests (again to exit at once)",
                    signal.Signals(signum).name,
                )
            self._server.stop()
            self._wait_for_end()
            runner.join()
        if self._failure is not None:
            raise CliError(f"server failed: {_one_line(self._failure)}{TRACEBACK_HINT}", EXIT_ERROR)
        if self._server.failure is not None:  # it stopped by itself: serving could not go on
            raise CliError(f"server stopped: {_one_line(self._server.failure)}", EXIT_ERROR)
        return EXIT_OK

    def _run_server(self) -> None:
        """The runner thread: start the server (the pool boots here), report that it
        serves, wait for its end and report that too."""
        try:
            self._server.start()
            self._serving.set()
            self._signals.notify()
            self._server.join()
        except Exception as exc:
            self._record_failure(exc)
        finally:
            self._ended.set()
            self._signals.notify()

    def _record_failure(self, exc: BaseException) -> None:
        """Keep what made the server fail, for the exit code; its traceback goes to DEBUG."""
        logger.debug("the server failed", exc_info=exc)
        self._failure = exc

    def _wait_for_shutdown(self) -> int | None:
        """Carry out operation signals and log stats until a shutdown signal (its
        number is returned) or the server's own end (``None``).

        Operation signals that come while the server starts (its workers boot)
        are queued, and carried out once it serves, as gunicorn's arbiter does.
        """
        stats_due = _Schedule(self._stats_interval_s)
        queued: list[int] = []
        while not self._ended.is_set():
            for signum in self._signals.wait(stats_due.seconds_left()):
                if signum in SHUTDOWN_SIGNALS:
                    return signum
                queued.append(signum)
                if not self._serving.is_set():
                    logger.info("%s: queued until the server serves", signal.Signals(signum).name)
            if self._serving.is_set():
                for signum in _without_repeated_hups(queued):
                    operate(self._server, signum)
                queued.clear()
            if stats_due.take() and self._serving.is_set():
                logger.info("stats %s", format_stats(self._server.stats()))
        return None

    def _wait_for_end(self) -> None:
        """Wait for the server to stop; past the graceful timeout (and a margin), exit now.

        A second shutdown signal exits at once (see :func:`_exit_on_second_shutdown`);
        operation signals are ignored now.
        """
        deadline = time.monotonic() + self._graceful_timeout_s + EXIT_MARGIN_S
        while not self._ended.is_set():
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                logger.error("the server did not stop within the graceful timeout; exiting now")
                _hard_exit(EXIT_ERROR)
            for signum in self._signals.wait(left_s):
                if signum in OPERATION_SIGNALS:
                    name = signal.Signals(signum).name
                    logger.warning("%s ignored: the server is stopping", name)


@contextlib.contextmanager
def failures_of(
    thread: threading.Thread, record: Callable[[BaseException], None]
) -> Iterator[None]:
    """While the block runs, an exception that ends ``thread`` goes to ``record``
    instead of a traceback on stderr (:func:`threading.excepthook`); other threads'
    go to the hook that was there before, which is put back afterwards."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.thread is thread and args.exc_value is not None:
            record(args.exc_value)
        else:
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


class _Schedule:
    """When the next periodic action is due; ``interval_s=None``: never."""

    def __init__(self, interval_s: float | None) -> None:
        self._interval_s = math.inf if interval_s is None else interval_s
        self._due = time.monotonic() + self._interval_s

    def seconds_left(self) -> float | None:
        """Seconds until it is due (0 or less: now); ``None`` if never."""
        return None if math.isinf(self._due) else self._due - time.monotonic()

    def take(self) -> bool:
        """Whether it is due; if so, the next one is an interval from now."""
        now = time.monotonic()
        if now < self._due:
            return False
        self._due = now + self._interval_s
        return True


def _without_repeated_hups(signals: list[int]) -> list[int]:
    """``signals`` without the SIGHUPs after the first: one rolling restart loads
    the code as it is now, however many SIGHUPs came together."""
    kept: list[int] = []
    for signum in signals:
        if signum != signal.SIGHUP or signal.SIGHUP not in kept:
            kept.append(signum)
    return kept


def operate(server: RequestServer, signum: int) -> None:
    """Carry out an operation signal, as gunicorn's arbiter does: SIGHUP replaces
    every worker (one at a time), SIGTTIN adds one, SIGTTOU removes one (it drains
    first; never the last). Outside process mode, it is logged and ignored."""
    name = signal.Signals(signum).name
    stats = server.stats()
    workers = stats.get("workers_wanted")
    if workers is None:
        logger.warning("%s ignored: only process mode (--workers) has workers to manage", name)
    elif signum == signal.SIGHUP:
        logger.info("SIGHUP: replacing the %d workers one at a time", workers)
        server.restart_workers()
    elif signum == signal.SIGTTIN:
        logger.info("SIGTTIN: %d workers -> %d", workers, workers + 1)
        server.resize(workers + 1)
    elif workers > 1:
        logger.info("SIGTTOU: %d workers -> %d", workers, workers - 1)
        server.resize(workers - 1)
    else:
        logger.warning("SIGTTOU ignored: the last worker stays")


def _exit_now(signum: int) -> NoReturn:
    """Exit without draining, terminating the worker processes so none outlive us."""
    with contextlib.suppress(OSError):
        name = signal.Signals(signum).name
        os.write(sys.stderr.fileno(), f"{PROG}: second {name}: exiting now\n".encode())
    _hard_exit(EXIT_SIGNAL_BASE + signum)


def _hard_exit(code: int) -> NoReturn:
    """Exit at once with ``code``, terminating the worker processes so none outlive us.

    Process-mode pools are told first, so that their supervisors start no
    replacement for the workers killed here (nor a listener for them).
    """
    pool = sys.modules.get("mpreqrep._pool")  # never imported: no process-mode workers
    if pool is not None:
        pool.kill_every_worker()
    for child in multiprocessing.active_children():
        child.terminate()
    remove_socket_directories()
    os._exit(code)


def format_stats(stats: Mapping[str, object]) -> str:
    """Render :meth:`RequestServer.stats` as ``key=value`` pairs on one line.

    Floats get 4 significant digits, ``None`` becomes ``-`` and collections
    (such as the per-worker list) are shown by their length.
    """
    return " ".join(f"{key}={_format_stat(value)}" for key, value in stats.items())


def _format_stat(value: object) -> str:
    """One stats value, compactly."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple, dict)):
        return str(len(value))
    return str(value)
