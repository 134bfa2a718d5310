"""The dispatch seam: run_handler and the inline and executor dispatchers."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from mpreqrep._dispatch import ExecutorDispatcher, InlineDispatcher, run_handler, thread_dispatcher
from mpreqrep._errors import HandlerReturnTypeError

from .conftest import UNIT


class Handler:
    def handle_request(self, request: str) -> str:
        if request == "raise":
            raise KeyError(request)
        if request == "none":
            return None  # type: ignore[return-value]
        return request * 2


def test_run_handler_checks_the_reply_type() -> None:
    assert run_handler(Handler(), "ab") == "abab"
    with pytest.raises(HandlerReturnTypeError, match="NoneType"):
        run_handler(Handler(), "none")
    with pytest.raises(KeyError):
        run_handler(Handler(), "raise")


def test_inline_dispatcher_returns_done_futures() -> None:
    dispatcher = InlineDispatcher(Handler())
    dispatcher.start()
    assert dispatcher.submit("x").result(timeout=0) == "xx"
    assert isinstance(dispatcher.submit("raise").exception(timeout=0), KeyError)
    assert dispatcher.stats() == {}
    dispatcher.shutdown()


def test_thread_dispatcher_runs_on_its_own_threads_and_owns_them() -> None:
    dispatcher = thread_dispatcher(Handler(), max_threads=2)
    names = dispatcher.submit("q")
    assert names.result(timeout=10 * UNIT) == "qq"
    dispatcher.shutdown()
    with pytest.raises(RuntimeError):
        dispatcher.submit("after shutdown")


def test_executor_dispatcher_leaves_a_users_executor_running() -> None:
    with ThreadPoolExecutor(max_workers=1) as pool:
        dispatcher = ExecutorDispatcher(pool, Handler(), owned=False)
        assert dispatcher.submit("u").result(timeout=10 * UNIT) == "uu"
        dispatcher.shutdown()
        assert pool.submit(threading.get_ident).result(timeout=10 * UNIT) > 0
