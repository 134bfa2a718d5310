"""The public surface: exactly what __all__ names, each importable, and a light import."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import mpreqrep
from mpreqrep import _aclient, _dask, _server

from .conftest import UNIT

# Never loaded by `import mpreqrep` (the client path): they load on first use.
HEAVY = ("asyncio", "loky", "psutil", "concurrent.futures.process", "distributed")


def modules_loaded_by(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``code``."""
    script = f"import sys\n{code}\nprint(' '.join(sys.modules))"
    completed = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60 * UNIT,
        check=True,
    )
    return set(completed.stdout.split())


def test_all_names_exist() -> None:
    for name in mpreqrep.__all__:
        assert hasattr(mpreqrep, name), name


def test_public_names_are_exactly_all() -> None:
    public = {name for name in dir(mpreqrep) if not name.startswith("_")} - {"annotations"}
    assert public == set(mpreqrep.__all__) - {"__version__"}
    assert {"do_request", "RequestServer", "split_address", "port_hash", "NoServerError"} <= set(
        mpreqrep.__all__
    )


def test_lazy_names_are_the_modules_own_objects() -> None:
    assert mpreqrep.RequestServer is _server.RequestServer
    assert mpreqrep.do_request_async is _aclient.do_request_async
    assert mpreqrep.dask_executor is _dask.dask_executor


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        mpreqrep.no_such_name  # type: ignore[attr-defined]  # noqa: B018


def test_every_name_imports_in_a_fresh_interpreter() -> None:
    names = ", ".join(name for name in mpreqrep.__all__ if name != "__version__")
    loaded = modules_loaded_by(f"from mpreqrep import {names}")
    assert {"mpreqrep._server", "mpreqrep._aclient", "mpreqrep._remote"} <= loaded


def test_import_loads_no_heavy_module() -> None:
    loaded = modules_loaded_by("import mpreqrep")
    assert not loaded & set(HEAVY), loaded & set(HEAVY)
    # The client path needs sockets only: no server, no logging, no typing.
    assert not loaded & {"mpreqrep._server", "logging", "typing", "threading"}


def test_thread_mode_loads_no_heavy_module() -> None:
    code = (
        "import mpreqrep\n"
        "with mpreqrep.RequestServer('localhost:0', async_val=True) as server:\n"
        "    assert mpreqrep.do_request(server.address, 'x', 30) == 'Requested: x\\r\\n'"
    )
    loaded = modules_loaded_by(code)
    assert not loaded & set(HEAVY), loaded & set(HEAVY)
    # Keeps the server as light as yoton's in pyzo (README, "Coming from yoton"):
    # import typing names under `if TYPE_CHECKING:` and use no dataclass here.
    assert not loaded & {"typing", "dataclasses"}, loaded & {"typing", "dataclasses"}


def test_version_is_pep440() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]\d+|rc\d+|\.dev\d+)?", mpreqrep.__version__)


def test_no_server_error_is_both_runtime_and_connection_error() -> None:
    assert issubclass(mpreqrep.NoServerError, RuntimeError)
    assert issubclass(mpreqrep.NoServerError, ConnectionError)
