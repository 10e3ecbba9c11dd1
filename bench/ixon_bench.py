"""IXON recording benchmark: webhook 2xx → ffmpeg's first frame, and ffmpeg CPU seconds per recorded minute.

Strategy: everything is real and on loopback. Latency: the real daemon (``hookd.py`` via
tests/support.Daemon) records from tests/fake_camera.py, either straight (``stream.url``) or through the
IXON API v2 fake (token, ``POST /web-access``, cookie, proxy); for each webhook the time between
receiving its 2xx and the camera writing the first frame to ffmpeg's connection is measured with one
monotonic clock (the camera runs in this process). CPU: ``hookd_core.ffmpeg.record`` is called directly,
and the CPU time of the ffmpeg child (user + system, from ``wait4``) is scaled to one recorded minute,
for ``recode`` on (libx264 ultrafast) and off (stream copy), at two camera sizes. Prints a markdown
table and writes the figures as JSON to the path given.

    python3 bench/ixon_bench.py OUT.json [--runs 5] [--seconds 10]
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from hookd_core import ffmpeg  # noqa: E402
from tests.fake_camera import FakeCamera  # noqa: E402
from tests.fake_ixon import FakeIxon  # noqa: E402
from tests.support import Daemon, post, wait_until  # noqa: E402

MESSAGE = {"createdOn": "2024-01-01T00:00:00", "extraInfo": {"Device name": "bench"}}


def latency(mode, runs):
    """Seconds from each webhook's 2xx to the camera's first frame, for ``mode`` direct or ixon."""
    cam = FakeCamera(fps=10)
    ixon = FakeIxon(cam) if mode == "ixon" else None
    if ixon:
        section = ("api.url = %s\napi.application = %s\ncompany = %s\ntoken = %s\nwebaccess.server = %s\n"
                   % (ixon.api_url, ixon.application, ixon.company, next(iter(ixon.tokens)),
                      ixon.server_id))
    else:
        section = "stream.url = %s\n" % cam.stream_url
    d = Daemon("[hookd]\nworkers = 2\n\n[ixon]\nkey = bench-key\n%sduration = 2\n" % section).start()
    out = []
    try:
        for i in range(runs):
            msg = dict(MESSAGE, createdOn="2024-01-01T00:00:%02d" % i)
            status, _, body = post(d.url + "/ixon/webhook/bench-key", json.dumps(msg), {"Content-Type": "application/json"})
            answered = time.monotonic()
            if status != 202:
                raise SystemExit("webhook answered %d: %s" % (status, body))
            wait_until(lambda: len(cam.first_frame_at) > i, 30, message="first frame")
            out.append(cam.first_frame_at[i] - answered)
            d.wait_status(json.loads(body)["id"], "done", timeout=60)
    finally:
        d.stop()
        if ixon:
            ixon.close()
        cam.close()
    return out


def cpu(size, fps, recode, seconds):
    """ffmpeg CPU seconds per recorded minute for one clip of ``seconds``."""
    cam = FakeCamera(fps=fps, size=size)
    with tempfile.TemporaryDirectory(prefix="ixon-bench-") as tmp:
        try:
            clip = ffmpeg.record(["-i", cam.stream_url], os.path.join(tmp, "c.mp4"), seconds, recode=recode,
                                 stopping=threading.Event())
        finally:
            cam.close()
        size_bytes = os.path.getsize(clip.path)
    return {"size": size, "fps": fps, "recode": recode, "clip_s": round(clip.duration, 2),
            "cpu_s": round(clip.cpu, 3), "cpu_s_per_min": round(clip.cpu * 60.0 / clip.duration, 2),
            "mb_per_min": round(size_bytes * 60.0 / clip.duration / 1e6, 2)}


def summary(values):
    return {"runs": len(values), "median_s": round(statistics.median(values), 3),
            "min_s": round(min(values), 3), "max_s": round(max(values), 3)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="JSON file to write")
    p.add_argument("--runs", type=int, default=5, help="webhooks per latency mode")
    p.add_argument("--seconds", type=float, default=10, help="clip length for the CPU figures")
    args = p.parse_args(argv)
    ver = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.split("\n")[0]
    result = {"ffmpeg": ver, "python": platform.python_version(), "cpus": os.cpu_count(),
              "latency": {m: summary(latency(m, args.runs)) for m in ("direct", "ixon")},
              "cpu": [cpu(size, fps, recode, args.seconds)
                      for size, fps in (("320x240", 10), ("1280x720", 15)) for recode in (True, False)]}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print("| webhook 2xx → first frame | median | min | max |\n|---|---|---|---|")
    for mode, s in result["latency"].items():
        print("| %s (%d runs) | %.3f s | %.3f s | %.3f s |" % (mode, s["runs"], s["median_s"], s["min_s"], s["max_s"]))
    print("\n| camera | recode | ffmpeg CPU s / recorded min | MB / min |\n|---|---|---|---|")
    for c in result["cpu"]:
        print("| %s @ %d fps MJPEG | %s | %.2f | %.2f |" % (c["size"], c["fps"], "libx264" if c["recode"] else "copy",
                                                         c["cpu_s_per_min"], c["mb_per_min"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
