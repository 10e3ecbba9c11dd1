#!/usr/bin/env python3
"""hookd: receive webhooks, verify them, store them durably, answer at once, do the work afterwards.

Run ``python3 hookd.py [HOST:PORT] [--config FILE]`` for the daemon (default 127.0.0.1:8000), or
``python3 hookd.py --help`` for the subcommands. The code lives in ``hookd_core/`` (intake, store,
workers, CLI) and ``handlers/`` (one module per integration).
"""

import os
import sys

if sys.version_info < (3, 9):
    sys.exit("hookd needs Python 3.9 or newer")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hookd_core.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
