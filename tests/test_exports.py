"""The public surface: exactly what __all__ names, each importable."""

from __future__ import annotations

import re

import mpreqrep


def test_all_names_exist() -> None:
    for name in mpreqrep.__all__:
        assert hasattr(mpreqrep, name), name


def test_public_names_are_exactly_all() -> None:
    public = {name for name in vars(mpreqrep) if not name.startswith("_")} - {"annotations"}
    assert public <= set(mpreqrep.__all__)
    assert {"do_request", "RequestServer", "split_address", "port_hash", "NoServerError"} <= set(
        mpreqrep.__all__
    )


def test_version_is_pep440() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]\d+|rc\d+|\.dev\d+)?", mpreqrep.__version__)


def test_no_server_error_is_both_runtime_and_connection_error() -> None:
    assert issubclass(mpreqrep.NoServerError, RuntimeError)
    assert issubclass(mpreqrep.NoServerError, ConnectionError)
