"""One wrk run: fixed connections and duration, one thread, pinned to the client core, parsed result.

Strategy: wrk is started as ``wrk -t1 -cN -dDs --timeout 5s -s LUA URL -- POOL PATH HEADER`` (one
client thread is plenty for one server core, and keeps every request in one Lua state walking one pool).
wrk runs the Lua ``init()`` before it connects; init reads the whole request pool (seconds for a large
one, with the server idle) and then prints ``BENCHREADY``. wrk's output is read as it comes: the
caller's meters start at that line and stop when wrk has exited, so a server's CPU share is over wrk's
run alone, as wrk's own req/s is. The Lua ``done()`` prints a ``BENCHJSON {...}`` line; ``run`` returns
it as a dict with req/s computed from completed requests over wrk's own measured duration, and
``ready_s``, the seconds wrk took to reach its marker (left out of the meters). A wrk that hangs is
killed after the run length plus a margin, so a run is always bounded in time.
"""

import json
import os
import subprocess
import threading
import time

from . import procs

LUA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lua")
READY = "BENCHREADY"


def run(lua, url, conns, seconds, pool_path, route, header="", meters=()):
    """Drive ``url`` for ``seconds`` with ``conns`` connections; the parsed BENCHJSON dict. ``meters``
    (objects with ``start()`` and ``stop()``, such as measure.CpuMeter) measure wrk's run alone."""
    argv = procs.pinned(["wrk", "-t1", "-c%d" % conns, "-d%ds" % seconds, "--timeout", "5s",
                         "-s", os.path.join(LUA_DIR, lua), url, "--", pool_path, route, header],
                        procs.CLIENT_CPU)
    spawned = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    killer = threading.Timer(seconds + 60, proc.kill)
    killer.start()
    lines, ready_s = [], None
    try:
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace")
            if ready_s is None and line.startswith(READY):
                ready_s = time.monotonic() - spawned
                for meter in meters:
                    meter.start()
            lines.append(line)
        proc.wait()
    finally:
        killer.cancel()
        proc.stdout.close()
    if ready_s is not None:
        for meter in meters:
            meter.stop()
    out = "".join(lines)
    for line in lines:
        if line.startswith("BENCHJSON ") and ready_s is not None:
            result = json.loads(line[len("BENCHJSON "):])
            result["rps"] = result["requests"] / max(result["duration_us"], 1) * 1e6
            result["socket_errors"] = sum(result[k] for k in ("connect", "read", "write", "timeout"))
            result["ready_s"] = round(ready_s, 3)
            return result
    raise RuntimeError("wrk gave no %s (exit %s):\n%s" % ("result" if ready_s is not None else READY + " line",
                                                          proc.returncode, out[-2000:]))
