"""One wrk run: fixed connections and duration, one thread, pinned to the client core, parsed result.

Strategy: wrk is started as ``wrk -t1 -cN -dDs --timeout 5s -s LUA URL -- POOL PATH HEADER`` (one
client thread is plenty for one server core, and keeps every request in one Lua state walking one pool).
The Lua ``done()`` prints a ``BENCHJSON {...}`` line; ``run`` returns it as a dict with req/s computed
from completed requests over wrk's own measured duration. A wrk that hangs is killed after the run
length plus a margin, so a run is always bounded in time.
"""

import json
import os
import subprocess

from . import procs

LUA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lua")


def run(lua, url, conns, seconds, pool_path, route, header=""):
    """Drive ``url`` for ``seconds`` with ``conns`` connections; the parsed BENCHJSON dict."""
    argv = procs.pinned(["wrk", "-t1", "-c%d" % conns, "-d%ds" % seconds, "--timeout", "5s",
                         "-s", os.path.join(LUA_DIR, lua), url, "--", pool_path, route, header],
                        procs.CLIENT_CPU)
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=seconds + 60, check=False)
    out = proc.stdout.decode("utf-8", "replace")
    for line in out.splitlines():
        if line.startswith("BENCHJSON "):
            result = json.loads(line[len("BENCHJSON "):])
            result["rps"] = result["requests"] / max(result["duration_us"], 1) * 1e6
            result["socket_errors"] = sum(result[k] for k in ("connect", "read", "write", "timeout"))
            return result
    raise RuntimeError("wrk gave no result (exit %s):\n%s" % (proc.returncode, out[-2000:]))
