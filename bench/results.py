"""Write one benchmark's section of ``bench/RESULTS.md`` and leave every other section as it is.

A section is a ``## <name>`` heading and everything up to the next ``## `` heading; each benchmark
owns its own, so several people (and runs) can update the file without touching each other's figures.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
_HEADER = "# Benchmark results\n\nEach section is written by its benchmark; the command that made it is in the section.\n"


def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    text = path.read_text() if path.exists() else _HEADER
    section = f"## {name}\n\n_Measured {time.strftime('%Y-%m-%d %H:%M %Z')}._\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)
