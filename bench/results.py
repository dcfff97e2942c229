"""Write one benchmark's section of ``bench/RESULTS.md`` and leave every other section as it is.

A section is a ``## <name>`` heading and everything up to the next ``## `` heading; each benchmark
owns its own, so several people (and runs) can update the file without touching each other's figures.
The helpers below are the command-line tail every benchmark shares: ``--no-write``, the arguments that go
in a section's command, and "print the section, then write it".
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
_HEADER = "# Benchmark results\n\nEach section is written by its benchmark; the command that made it is in the section.\n"
NO_WRITE = "print only; leave bench/RESULTS.md alone"


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    text = path.read_text() if path.exists() else _HEADER
    section = f"## {name}\n\n_Measured {time.strftime('%Y-%m-%d %H:%M %Z')}._\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None, *,
               no_write: str = NO_WRITE) -> argparse.Namespace:
    """Parse a benchmark's command line after adding the ``--no-write`` flag every benchmark has (last, as
    ``--help`` lists it)."""
    parser.add_argument("--no-write", action="store_true", help=no_write)
    return parser.parse_args(argv)


def arguments(argv: list[str] | None) -> str:
    """The arguments a run was given, as they go in its section's command (``--no-write`` never does)."""
    return "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]) if a != "--no-write")


def finish(name: str, text: str, write: bool) -> None:
    """Print a benchmark's section and, if ``write`` (no ``--no-write``), write it."""
    print(text)
    if write:
        write_section(name, text)
