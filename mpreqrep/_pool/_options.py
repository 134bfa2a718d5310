"""Process mode's options: the worker count (``"auto"``) and range checks.

Pure apart from asking psutil for the number of cores.
"""

from __future__ import annotations

import psutil


def resolve_worker_count(workers: int | str | None) -> int:
    """The number of worker processes that ``workers`` asks for.

    Args:
        workers: an int >= 1, a string of one, or ``"auto"`` (or ``None``)
            for the number of physical cores (logical ones if psutil cannot
            tell, at least 1).

    Returns:
        The worker count, at least 1.

    Raises:
        ValueError: ``workers`` is below 1, not a whole number, or a string
            other than ``"auto"`` or digits.
    """
    if workers is None or workers == "auto":
        return int(psutil.cpu_count(logical=False) or psutil.cpu_count() or 1)
    if isinstance(workers, str):
        try:
            count = int(workers)
        except ValueError as exc:
            raise ValueError(f'workers must be an int >= 1 or "auto", not {workers!r}') from exc
    elif isinstance(workers, int) and not isinstance(workers, bool):
        count = workers
    else:
        raise ValueError(f'workers must be an int >= 1 or "auto", not {workers!r}')
    if count < 1:
        raise ValueError(f"workers must be at least 1, not {count}")
    return count


def check_options(
    workers: int, request_timeout_s: float | None, max_worker_memory: int | None
) -> None:
    """Reject a worker count, timeout or memory cap that is out of range.

    Raises:
        ValueError: one of them is out of range.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    if request_timeout_s is not None and not request_timeout_s > 0:  # NaN too
        raise ValueError(f"request_timeout_s must be positive, not {request_timeout_s}")
    if max_worker_memory is not None and max_worker_memory <= 0:
        raise ValueError(f"max_worker_memory must be positive, not {max_worker_memory}")


def check_recycling(max_requests: int | None, jitter: int) -> None:
    """Reject a ``max_requests`` below 1 or a negative ``max_requests_jitter``.

    Raises:
        ValueError: one of them is out of range, or not an int.
    """
    if max_requests is not None and (not _is_int(max_requests) or max_requests < 1):
        raise ValueError(f"max_requests must be an int of at least 1, not {max_requests!r}")
    if not _is_int(jitter) or jitter < 0:
        raise ValueError(f"max_requests_jitter must be an int of at least 0, not {jitter!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
