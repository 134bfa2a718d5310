"""Coverage-guided fuzzing of the framing layer with atheris: the optional long run.

The normal test run fuzzes ``mpreqrep._framing`` with hypothesis
(``tests/test_fuzz_framing.py``); this runs the same check for as long as you
like, guided by coverage. Each input chooses a size cap and the chunk
lengths, and the rest of it is the bytes that arrive; the receiver must agree
with the reference model after every chunk, and nothing but
``RequestTooLargeError`` may escape.

Usage (atheris is not a dependency; it needs a clang-built CPython wheel)::

    .venv/bin/python -m pip install atheris
    .venv/bin/python scripts/fuzz_framing_atheris.py -max_total_time=600 [corpus_dir]

Any libFuzzer flag works. A failing input is written to ``crash-*``; replay
it by passing the file instead of a corpus directory.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import atheris

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # for tests.test_fuzz_framing

with atheris.instrument_imports():
    import mpreqrep._framing  # noqa: F401 - instrumented before the checks import it

from tests.test_fuzz_framing import check_chunks, cut  # noqa: E402

MAX_CAP = 300
MAX_CHUNKS = 16
MAX_CHUNK_SIZE = 64


def test_one_input(data: bytes) -> None:
    """Split one fuzzer input into a cap, chunk lengths and payload; check them."""
    provider = atheris.FuzzedDataProvider(data)
    max_size = provider.ConsumeIntInRange(0, MAX_CAP) or None  # 0: no cap
    lengths = [
        provider.ConsumeIntInRange(1, MAX_CHUNK_SIZE)
        for _ in range(provider.ConsumeIntInRange(0, MAX_CHUNKS))
    ]
    payload = provider.ConsumeBytes(provider.remaining_bytes())
    check_chunks(cut(payload, list(itertools.accumulate(lengths))), max_size)


def main() -> None:
    """Hand the command line to libFuzzer and fuzz until it stops."""
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
