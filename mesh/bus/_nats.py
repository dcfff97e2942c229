"""nats-py, imported once for the whole bus — without its websocket transport.

nats-py imports aiohttp at import time only for ``ws://`` servers, which Mesh does not use (its URLs are
``nats://`` and ``tls://``). That import was ~40% of ``import nats`` (0.12 s CPU of every CLI command and
node start). Hiding aiohttp while nats-py loads leaves its websocket transport unavailable (a ``ws://``
URL gets nats-py's own "Could not import aiohttp transport" error); aiohttp itself stays importable for
the modules that use it.
"""

from __future__ import annotations

import sys

_hidden = "aiohttp" not in sys.modules
if _hidden:
    sys.modules["aiohttp"] = None  # type: ignore[assignment]  # import raises ImportError
try:
    import nats  # noqa: F401  (loads nats.aio.transport, the only module that looks for aiohttp)
finally:
    if _hidden:
        del sys.modules["aiohttp"]
