"""Benchmark mpreqrep against yoton and socketserver, closed loop over loopback.

For every server and handler the benchmark starts a peer process (see
``peers.py``), warms it up, then drives it with each client count through
the load generator (``loadgen.py``) for a bounded time and request count,
measuring throughput, latency, errors and the CPU time of both sides.
Results go to a table on stdout and optionally to JSON, Markdown and a PNG.

Run it through the ``scripts/bench`` wrapper, which sets up ``.venv``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from loadgen import DEFAULT_LOOP, LOOPS, GeneratorPool, LoadResult, LoadSpec, merge_results
from peers import HANDLERS, PEERS, PeerError, PeerProcess
from tqdm import tqdm

CALIBRATION_PEER = "uvloop"
DEFAULT_SERVERS = [name for name in PEERS if name != CALIBRATION_PEER]
BASELINE = "threading"
BUSY_FRACTION = 0.9  # generator CPU / (wall x processes) past which it may be the bottleneck
FULL: dict[str, Any] = {
    "clients": [1, 16, 64],
    "duration": 3.0,
    "rounds": 3,
    "max_requests": 200_000,
    "warmup": 0.5,
    "ceiling": 2.0,
}
QUICK: dict[str, Any] = {
    "clients": [1, 8],
    "duration": 0.5,
    "rounds": 1,
    "max_requests": 2000,
    "warmup": 0.2,
    "ceiling": 0.5,
}


@dataclass
class Row:
    """One cell of the benchmark: a server and handler at one client count."""

    server: str
    handler: str
    clients: int
    requests_per_s: float = 0.0
    ratio: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    ok: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    server_cpu_s: float = 0.0
    generator_cpu_s: float = 0.0
    wall_s: float = 0.0
    generator_busy: bool = False
    note: str = ""

    @property
    def server_cpu_us_per_request(self) -> float | None:
        """Server CPU per successful request: comparable even when the generator is busy."""
        return self.server_cpu_s / self.ok * 1e6 if self.ok else None


@dataclass
class Measurement:
    """One round of one cell: what the generator and the peer's CPU counter saw."""

    server: str
    handler: str
    clients: int
    result: LoadResult | None = None
    server_cpu_s: float = 0.0
    note: str = ""


@dataclass(frozen=True)
class Ceiling:
    """What the generator managed against the calibration peer."""

    requests_per_s: float
    requests_per_generator_cpu_s: float
    clients: int
    processes: int
    loop: str

    def describe(self) -> str:
        """One line for the report."""
        return (
            f"generator ceiling: {self.requests_per_s:,.0f} req/s against the {CALIBRATION_PEER}"
            f" peer ({self.clients} clients, {self.processes} process(es), {self.loop});"
            f" {self.requests_per_generator_cpu_s:,.0f} req per generator CPU-second"
        )


# -- command line -------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers such as 1,16,64")
    return values


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _name_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = sorted(set(names) - set(choices))
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}; got {text!r}")
        return names

    return parse


EPILOG = """\
servers:
{servers}

handlers:
  echo        'Requested: ' + request, as yoton's default handler
  primes      workers.primes.count_primes({limit}): about 10 ms of pure Python

columns:
  req/s       successful requests per second; '*' marks a generator busy for
              >= {busy:.0%} of the time, so the server may be faster than shown
  ratio       req/s over the {baseline} server's, same handler, clients and run
  p50, p99    latency of successful requests in ms, connect included
  errors      refused, reset, timed-out, empty or wrong replies (never retried)
  srv CPU s   CPU seconds of the server's whole process tree during the cell
  gen CPU s   CPU seconds of the load generator processes
  srv us/req  server CPU per request, comparable even when the generator is busy

examples:
  scripts/bench                 full run: about 3 minutes on 2 cores
  scripts/bench --quick         smoke run: well under a minute
  scripts/bench --servers threading,mpreqrep-thread --handlers echo --clients 16
  scripts/bench --json out.json --markdown out.md --plot out.png
"""


def _defaults(name: str) -> str:
    """The help suffix naming an option's full and ``--quick`` defaults."""
    full, quick = FULL[name], QUICK[name]
    if isinstance(full, list):
        full, quick = ",".join(map(str, full)), ",".join(map(str, quick))
    return f"(default: {full}; with --quick: {quick})"


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    servers = "\n".join(f"  {name:17}{peer.description}" for name, peer in PEERS.items())
    epilog = EPILOG.format(
        servers=servers, limit=HANDLERS["primes"].request, busy=BUSY_FRACTION, baseline=BASELINE
    )
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Closed-loop throughput and latency of mpreqrep, yoton and socketserver "
        "over 127.0.0.1, one peer process per server. Every cell is bounded in time and "
        "request count.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=epilog,
    )
    add = parser.add_argument
    add("--servers", type=_name_list(list(PEERS)), help="comma list (default: all but uvloop)")
    add("--handlers", type=_name_list(list(HANDLERS)), help="comma list (default: all)")
    add("--clients", type=_int_list, help="concurrent clients per cell " + _defaults("clients"))
    add("--duration", type=float, help="seconds of load per cell " + _defaults("duration"))
    add(
        "--rounds",
        type=_positive_int,
        help="sweeps over all servers that share each cell's duration and budget, so that "
        "a machine slowing down mid-run costs every server alike " + _defaults("rounds"),
    )
    add("--max-requests", type=int, help="request budget per cell " + _defaults("max_requests"))
    add("--warmup", type=float, help="seconds of load after a peer starts " + _defaults("warmup"))
    add(
        "--ceiling",
        type=float,
        help="seconds to measure the generator alone, 0 skips " + _defaults("ceiling"),
    )
    add(
        "--timeout",
        type=float,
        default=3.0,
        help="seconds per request, connect included (default: %(default)s)",
    )
    add("--processes", type=_positive_int, default=1, help="generator processes (default: 1)")
    add(
        "--loop",
        choices=LOOPS,
        default=DEFAULT_LOOP,
        help="generator event loop (default: %(default)s)",
    )
    add("--quick", action="store_true", help="a small run for CI and smoke tests")
    add("--json", type=Path, metavar="PATH", help="write rows and run details as JSON")
    add("--markdown", type=Path, metavar="PATH", help="write the table as Markdown")
    add("--plot", type=Path, metavar="PATH", help="write a PNG of requests/s against clients")
    add("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse options and fill in the defaults, the ``--quick`` ones if asked."""
    args = build_parser().parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.servers = args.servers or DEFAULT_SERVERS
    args.handlers = args.handlers or list(HANDLERS)
    return args


# -- measuring ----------------------------------------------------------------------------


def load_spec(args: argparse.Namespace, port: int, handler: str, clients: int) -> LoadSpec:
    """The load for one round of one cell."""
    return LoadSpec(
        port=port,
        request=HANDLERS[handler].request,
        expected_reply=HANDLERS[handler].expected_reply(),
        clients=clients,
        duration_s=args.duration / args.rounds,
        max_requests=max(1, args.max_requests // args.rounds),
        timeout_s=args.timeout,
        loop=args.loop,
    )


def measure_ceiling(pool: GeneratorPool, args: argparse.Namespace) -> Ceiling | None:
    """Drive the calibration peer with the most clients to find the generator's limit.

    Returns ``None``, after saying why, if the calibration peer cannot start.
    """
    clients = max(args.clients)
    try:
        with PeerProcess(CALIBRATION_PEER, "echo") as peer:
            spec = load_spec(args, peer.wait_ready(), "echo", clients)
            result = pool.run(replace(spec, duration_s=args.ceiling))
    except PeerError as exc:
        print(f"no generator ceiling: {exc}", file=sys.stderr)
        return None
    return Ceiling(
        requests_per_s=result.rate,
        requests_per_generator_cpu_s=result.ok / result.cpu_s if result.cpu_s else 0.0,
        clients=clients,
        processes=args.processes,
        loop=args.loop,
    )


def bench_peer(
    pool: GeneratorPool, args: argparse.Namespace, server: str, handler: str
) -> Iterator[Measurement]:
    """Start one peer, warm it up, and measure one round per client count.

    A peer that fails to start or dies yields measurements carrying the
    error for the client counts it did not serve.
    """
    remaining = list(args.clients)
    try:
        with PeerProcess(server, handler) as peer:
            port = peer.wait_ready()
            warmup = load_spec(args, port, handler, max(remaining))
            pool.run(replace(warmup, duration_s=args.warmup))
            while remaining:
                yield measure_cell(pool, args, peer, load_spec(args, port, handler, remaining[0]))
                del remaining[0]
                peer.check_alive()
    except PeerError as exc:
        tqdm.write(f"{server}/{handler}: {exc}", file=sys.stderr)
        yield from (
            Measurement(server, handler, clients, note=exc.summary) for clients in remaining
        )


def measure_cell(
    pool: GeneratorPool, args: argparse.Namespace, peer: PeerProcess, spec: LoadSpec
) -> Measurement:
    """Run one load against a running peer."""
    cpu_before_s = peer.cpu_seconds()
    result = pool.run(spec)
    server_cpu_s = peer.cpu_seconds() - cpu_before_s
    return Measurement(peer.server, peer.handler, spec.clients, result, server_cpu_s)


def combine_rounds(rounds: Sequence[Measurement], processes: int) -> Row:
    """One row from the rounds of a cell: counts and CPU add up, latencies pool,
    and the rate is the rounds' rates weighted by their duration."""
    first = rounds[0]
    failed = next((part for part in rounds if part.result is None), None)
    if failed is not None:
        return Row(first.server, first.handler, first.clients, note=failed.note)
    results = [part.result for part in rounds if part.result is not None]
    combined = merge_results(results)  # sums ok, errors, latencies and CPU
    combined.wall_s = sum(result.wall_s for result in results)
    combined.rate = (
        sum(result.rate * result.wall_s for result in results) / combined.wall_s
        if combined.wall_s > 0
        else 0.0
    )
    server_cpu_s = sum(part.server_cpu_s for part in rounds)
    return make_row(first.server, first.handler, first.clients, combined, server_cpu_s, processes)


def make_row(
    server: str, handler: str, clients: int, result: LoadResult, server_cpu_s: float, processes: int
) -> Row:
    """Turn a load result into a table row."""
    latencies = sorted(result.latencies_s)
    busy = result.wall_s > 0 and result.cpu_s / (result.wall_s * processes) >= BUSY_FRACTION
    return Row(
        server=server,
        handler=handler,
        clients=clients,
        requests_per_s=result.rate,
        p50_ms=_percentile_ms(latencies, 0.50),
        p99_ms=_percentile_ms(latencies, 0.99),
        max_ms=_percentile_ms(latencies, 1.0),
        ok=result.ok,
        errors=result.error_count,
        error_kinds=result.errors,
        server_cpu_s=server_cpu_s,
        generator_cpu_s=result.cpu_s,
        wall_s=result.wall_s,
        generator_busy=busy,
    )


def _percentile_ms(sorted_s: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile in milliseconds; ``None`` without samples."""
    if not sorted_s:
        return None
    index = min(len(sorted_s) - 1, max(0, round(fraction * len(sorted_s)) - 1))
    return sorted_s[index] * 1e3


def add_ratios(rows: list[Row]) -> None:
    """Set each row's ratio to the baseline server's rate at the same cell."""
    baseline = {(r.handler, r.clients): r.requests_per_s for r in rows if r.server == BASELINE}
    for row in rows:
        reference = baseline.get((row.handler, row.clients))
        row.ratio = row.requests_per_s / reference if reference and not row.note else None


def run_benchmark(args: argparse.Namespace) -> tuple[Ceiling | None, list[Row]]:
    """Measure the ceiling, then every server and handler in rounds, with a progress bar."""
    cells = len(args.servers) * len(args.handlers) * len(args.clients)
    measured: dict[tuple[str, str, int], list[Measurement]] = {}
    with GeneratorPool(args.processes) as pool:
        ceiling = measure_ceiling(pool, args) if args.ceiling > 0 else None
        with tqdm(total=cells * args.rounds, unit="cell", disable=args.no_progress) as progress:
            for round_number in range(1, args.rounds + 1):
                for server in args.servers:
                    for handler in args.handlers:
                        progress.set_postfix_str(f"round {round_number}: {server} {handler}")
                        for part in bench_peer(pool, args, server, handler):
                            key = (part.server, part.handler, part.clients)
                            measured.setdefault(key, []).append(part)
                            progress.update()
    rows = [combine_rounds(rounds, args.processes) for rounds in measured.values()]
    add_ratios(rows)
    return ceiling, rows


# -- reporting ----------------------------------------------------------------------------

COLUMNS = (
    "server", "handler", "clients", "req/s", "ratio", "p50 ms", "p99 ms",
    "errors", "srv CPU s", "gen CPU s", "srv us/req",
)  # fmt: skip


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def row_cells(row: Row) -> list[str]:
    """The row as table cells, in :data:`COLUMNS` order; a failed cell is mostly dashes."""
    head = [row.server, row.handler, str(row.clients)]
    if row.note:
        return [*head, "failed", *["-"] * (len(COLUMNS) - len(head) - 1)]
    return [
        *head, _number(row.requests_per_s, 0) + ("*" if row.generator_busy else ""),
        _number(row.ratio, 2), _number(row.p50_ms, 2), _number(row.p99_ms, 2), str(row.errors),
        _number(row.server_cpu_s, 2), _number(row.generator_cpu_s, 2),
        _number(row.server_cpu_us_per_request, 0),
    ]  # fmt: skip


def footnotes(rows: Sequence[Row], ceiling: Ceiling | None) -> list[str]:
    """The lines under the table: the ceiling, the busy marker, why peers failed."""
    notes = [ceiling.describe()] if ceiling is not None else []
    if any(row.generator_busy for row in rows):
        notes.append(f"* the generator was busy >= {BUSY_FRACTION:.0%} of the time: a lower bound")
    failures = {f"{row.server}/{row.handler} failed: {row.note}" for row in rows if row.note}
    return notes + sorted(failures)


def format_table(rows: Sequence[Row]) -> str:
    """A plain-text table: names left-aligned, numbers right-aligned."""
    table = [list(COLUMNS), *(row_cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return "\n".join(_align(line, widths) for line in table)


def _align(line: Sequence[str], widths: Sequence[int]) -> str:
    pairs = enumerate(zip(line, widths, strict=True))
    cells = [cell.ljust(width) if i < 2 else cell.rjust(width) for i, (cell, width) in pairs]
    return "  ".join(cells).rstrip()


def format_markdown(rows: Sequence[Row], ceiling: Ceiling | None) -> str:
    """The table as GitHub Markdown, the footnotes as a list under it."""
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join([":--", ":--"] + ["--:"] * (len(COLUMNS) - 2)) + "|",
        *("| " + " | ".join(row_cells(row)) + " |" for row in rows),
        "",
        *(f"- {note}" for note in footnotes(rows, ceiling)),
    ]
    return "\n".join(lines).replace("*", "\\*") + "\n"


def write_json(
    path: Path, args: argparse.Namespace, ceiling: Ceiling | None, rows: Sequence[Row]
) -> None:
    """Rows and run details as JSON."""
    run = {
        "options": vars(args),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "baseline": BASELINE,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ceiling": asdict(ceiling) if ceiling else None,
    }
    data = [
        {**asdict(row), "server_cpu_us_per_request": row.server_cpu_us_per_request} for row in rows
    ]
    path.write_text(json.dumps({"run": run, "rows": data}, indent=2, default=str) + "\n")


def write_plot(path: Path, rows: Sequence[Row], handlers: Sequence[str]) -> None:
    """Requests/s against clients, one line per server, one panel per handler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(handlers), figsize=(6 * len(handlers), 4.5), squeeze=False)
    for axis, handler in zip(axes[0], handlers, strict=True):
        _plot_panel(axis, [row for row in rows if row.handler == handler and row.ok], handler)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plot_panel(axis: Any, rows: Sequence[Row], handler: str) -> None:
    """One handler's lines; the y axis is logarithmic when rates span a decade."""
    for server in dict.fromkeys(row.server for row in rows):
        cells = [row for row in rows if row.server == server]
        axis.plot([r.clients for r in cells], [r.requests_per_s for r in cells], "o-", label=server)
    rates = [row.requests_per_s for row in rows if row.requests_per_s > 0] or [1.0]
    clients = sorted({row.clients for row in rows})
    yscale = "log" if max(rates) > 10 * min(rates) else "linear"
    axis.set(title=handler, xlabel="clients", ylabel="requests/s", xscale="log", yscale=yscale)
    axis.set_xticks(clients, [str(count) for count in clients])
    axis.minorticks_off()
    axis.grid(True, alpha=0.3)
    if rows:
        axis.legend(fontsize="small")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write the reports; 1 if every cell failed."""
    args = parse_args(argv)
    ceiling, rows = run_benchmark(args)
    print(format_table(rows))
    print("\n".join(footnotes(rows, ceiling)))
    if args.json:
        write_json(args.json, args, ceiling, rows)
    if args.markdown:
        args.markdown.write_text(format_markdown(rows, ceiling))
    if args.plot:
        write_plot(args.plot, rows, args.handlers)
    return 0 if any(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
