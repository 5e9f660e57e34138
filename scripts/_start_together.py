"""Run the ``peer`` command once every peer of a benchmark swarm is ready.

Usage: ``python scripts/_start_together.py READY_FILE GO_FILE -- peer arguments...``

Imports the CLI and the modules it loads lazily (the slow part of starting a
Python process: ~1.4 s for 8 leechers at once on 2 cores), creates
READY_FILE, waits for GO_FILE to appear, then runs ``peer`` with the given
arguments. The swarm scripts start every leecher this way and create GO_FILE
when all are ready, so "starting together" means together, not staggered by
interpreter start-up on a loaded 2-core machine. Nothing of the protocol is
skipped: tracker announce, connections, handshakes all happen after GO.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

from cli.app import main as peer_main

# The modules `peer get` imports lazily: loaded before the start signal too.
LAZY_MODULES = (
    "peerd.app.download",
    "peerd.node.node",
    "peerd.app.progress",
    "peerd.node.tracker_client",
    "peerd.transport.proactor",
    "peerd.transport.reactor",
)


def run() -> None:
    for name in LAZY_MODULES:
        importlib.import_module(name)
    ready, go, sep, *args = sys.argv[1:]
    if sep != "--":
        raise SystemExit("usage: _start_together.py READY GO -- peer arguments...")
    Path(ready).touch()
    go_file = Path(go)
    while not go_file.exists():
        time.sleep(0.005)
    sys.argv = ["peer", *args]
    peer_main()


if __name__ == "__main__":
    run()
