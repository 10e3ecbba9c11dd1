"""Camio hooks: label the key images of a camera event and POST the labels back to Camio.

Wire contract (CamioCam/examples ``hooks/hook-example.py``, ``hooks/README.md``, ``batch_import/EXAMPLE.md``).
A hook is registered with ``POST https://camio.com/api/users/me/hooks`` and a ``callback_url``; Camio then
POSTs each interesting event there as JSON, with no signature: the secret is the last path segment, so
hookd serves ``POST /camio/tasks/{api_key}`` (compared in constant time, never logged; wrong key 401). The
body has ``callback_url`` (Camio's URL for this event's answer), ``user_id``, ``camera`` and ``images[]``,
each ``{type, size, timestamp, image_b64}``; ``timestamp`` is an ISO string or
``{"meta_class": ..., "date": ...}`` (422 when the shape is wrong). The answer to Camio is
``POST callback_url`` with ``{"status": "success", "labels": {TIMESTAMP: {LABEL: {"probability": P,
"polygon": []}}}}``. ``GET /camio/tasks/{api_key}`` lists the events still waiting or running.

Strategy: ``accept`` stores the event (its payload without the image bytes, which stay in the raw body),
keyed on ``callback_url`` (no event id field is known). A worker decodes the images into
``state_dir/tmp/camio-<id>/`` (removed when the job ends), labels them, and posts the labels through
``CamioCallback``, but only to a host in ``callback.hosts`` (else the job fails, nothing sent); the answer
is mapped by ``client.check`` (any other non-2xx is retried), and labels already computed are kept in
``camio_labels`` so a retry only re-sends them. ``labeler = stats`` derives labels from the pixels with
ffmpeg's ``signalstats`` filter (thresholds below); ``labeler = command:PROG ARGS`` runs the user's model
with the payload JSON on stdin and posts the labels JSON it prints.
"""

import base64
import binascii
import json
import os
import re
import shlex
import shutil
import sqlite3

from hookd_core import actions, client, proc, verify
from hookd_core.api import (REQUIRED, BadPayload, Fail, Integration, NewEvent, Response, Retry, iso,
                            path_segment)
from hookd_core.config import ConfigError

PREFIX = "/camio/tasks/"
MAX_IMAGES = 100          # images per event; Camio sends a handful of key frames, not a video
MAX_PIXELS = 40000000     # per decoded image (ffmpeg -max_pixels): refuses decompression bombs
MAX_LISTED = 1000         # tasks in one GET answer
PENDING = ("queued", "running", "retry")

# Thresholds of the stats labeler, on 8-bit full-range values (0..255, JPEG's own scale; every image is
# converted to yuvj444p first). Each label's probability is 0.5 at its threshold and rises linearly to
# 1.0 at the far end given beside it ("how far past the threshold the measure is").
NIGHT_SATURATION = 3.0    # mean chroma saturation (SATAVG) below this: grey-scale infra-red frame; 1.0 at 0
DARK_LUMA = 64.0          # mean luma (YAVG) below this: "dark"; 1.0 at 0
BRIGHT_LUMA = 192.0       # mean luma above this: "bright"; 1.0 at 255
MOTION_DIFF = 6.0         # mean |luma difference| from the previous image (both at 160x120): "motion"
MOTION_FULL = 30.0        # ... probability 1.0 at this difference or more
DIFF_SIZE = "160:120"     # small frames average out sensor noise and JPEG artefacts before comparing

STATS_FILTER = "format=yuvj444p,signalstats,metadata=print:file=-"
DIFF_FILTER = ("[0:v]scale={s},setsar=1,format=gray[a];[1:v]scale={s},setsar=1,format=gray[b];"
               "[a][b]blend=all_mode=difference,format=yuvj444p,signalstats,metadata=print:file=-"
               ).format(s=DIFF_SIZE)
STAT_LINE = re.compile(r"lavfi\.signalstats\.([A-Z]+)=(-?[0-9.]+)")

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS camio_labels (
    event_id INTEGER PRIMARY KEY,   -- events.id
    labels TEXT NOT NULL            -- JSON, what will be posted as "labels"
);
"""


class CamioCallback:
    """The answer to Camio: POST the labels to the event's ``callback_url``, only to ``callback.hosts``."""

    def __init__(self, hosts, timeout):
        self.hosts, self.timeout = hosts, timeout

    def check_host(self, url):
        """Fail before any work when the labels could never be sent (SSRF guard; request() checks too)."""
        host = client.split_url(url)[1].lower()
        if host not in {h.lower() for h in self.hosts}:
            raise Fail("callback host %s is not in callback.hosts" % host)

    def post_labels(self, url, labels):
        body = json.dumps({"status": "success", "labels": labels}).encode("utf-8")
        reply = client.request("POST", url, headers={"Content-Type": "application/json"}, body=body,
                               timeout=self.timeout, allowed_hosts=self.hosts)
        client.check(reply, "Camio callback", refused="the event's callback_url", other=Retry)


class Handler(Integration):
    SECTION = "camio"
    route = PREFIX + "{api_key}"
    KEYS = {
        "api_key": REQUIRED,
        "labeler": "stats",
        "labeler.timeout": "60",
        "callback.hosts": "camio.com, www.camio.com",
        "callback.timeout": "30",
    }
    SECRET_KEYS = ("api_key",)
    SCHEMA = SCHEMA_SQL
    max_parallel = 2  # ffmpeg or a user's model per job; leave cores for intake

    # -- request thread --------------------------------------------------------------------------------

    def match(self, path):
        return path_segment(path, PREFIX) is not None

    def check(self):
        problems = []
        labeler = self.conf.get("labeler", "").strip()
        if labeler == "stats":
            if not shutil.which("ffmpeg"):
                problems.append("[%s] labeler = stats needs ffmpeg on PATH" % self.name)
        elif labeler.startswith("command:"):
            try:
                if not shlex.split(labeler[len("command:"):]):
                    problems.append("[%s] labeler = command: names no program" % self.name)
            except ValueError as e:
                problems.append("[%s] labeler: %s" % (self.name, e))
        else:
            problems.append("[%s] labeler must be stats or command:/path/to/program args" % self.name)
        if "/" in (self.conf.get("api_key") or ""):
            problems.append("[%s] api_key must not contain '/' (it is a path segment)" % self.name)
        if not self.conf.list("callback.hosts"):
            problems.append("[%s] callback.hosts is empty: labels could never be sent" % self.name)
        for key in ("labeler.timeout", "callback.timeout"):
            try:
                self.conf.float(key)
            except ConfigError as e:
                problems.append(str(e))
        return problems

    def accept(self, req):
        verify.path_secret(path_segment(req.path, PREFIX), self.conf.get("api_key"))
        payload = req.json()
        problem = payload_problem(payload)
        if problem:
            raise BadPayload(problem)
        # No event id is known in Camio's payload; callback_url is Camio's URL for this one event.
        # A section-level "dedupe" rule, if set, wins (None lets the core apply it).
        key = None if self.conf.get("dedupe") else "camio-callback:" + payload["callback_url"]
        return [NewEvent(payload=without_pixels(payload), dedupe_key=key)]

    def get(self, req):
        verify.path_secret(path_segment(req.path, PREFIX), self.conf.get("api_key"))
        route = self.name
        tasks = self.core.read(lambda conn: pending_tasks(conn, route))
        return Response(200, tasks)

    def callback(self):
        return CamioCallback(self.conf.list("callback.hosts"), self.conf.float("callback.timeout"))

    # -- worker thread ---------------------------------------------------------------------------------

    def run(self, ctx):
        payload = ctx.payload
        url = payload["callback_url"]
        callback = self.callback()
        callback.check_host(url)
        labels = self.core.read(lambda conn: cached_labels(conn, ctx.id))
        if labels is None:
            labels = self._label(ctx, full_task(ctx.body))
            self.core.write(lambda conn: remember_labels(conn, ctx.id, labels))
        callback.post_labels(url, labels)
        ctx.product("labels", data=labels)
        self.core.write(lambda conn: forget_labels(conn, ctx.id))
        ctx.action_input = {"camera": payload.get("camera"), "user_id": payload.get("user_id"),
                            "images": len(payload["images"]), "labels": labels}
        return "labels for %d image(s) posted to %s" % (len(payload["images"]), client.redact_url(url))

    def _label(self, ctx, task):
        """Decode the images into a private temp dir under state_dir, label them, remove the dir."""
        workdir = os.path.join(self.core.state_dir, "tmp", "camio-%s" % ctx.id)
        shutil.rmtree(workdir, ignore_errors=True)  # left over from a crash mid-job
        os.makedirs(os.path.dirname(workdir), exist_ok=True)
        os.mkdir(workdir, 0o700)
        try:
            images = write_images(workdir, task["images"])
            labeler = self.conf.get("labeler").strip()
            if labeler.startswith("command:"):
                return self._command_labels(ctx, labeler[len("command:"):], workdir)
            return stats_labels(images, self.conf.float("labeler.timeout"), ctx.log, ctx.stopping)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _command_labels(self, ctx, command, workdir):
        """Run the user's model: payload JSON on stdin, labels JSON on stdout, decoded images in cwd."""
        argv = shlex.split(command)
        timeout = self.conf.float("labeler.timeout")
        env = actions.job_env(ctx, self, HOOKD_IMAGE_DIR=workdir)
        try:
            done = proc.run(argv, stdin=ctx.body, timeout=timeout, env=env, cwd=workdir)
        except OSError as e:
            raise Fail("labeler %s cannot be started: %s" % (argv[0], e.strerror or e))
        if done.timed_out:
            raise Retry("labeler timed out after %gs (process group killed)" % timeout)
        if done.returncode != 0:
            stderr = tail(done.stderr).replace(self.conf.get("api_key"), "***")
            raise Retry("labeler exited with %d: %s" % (done.returncode, stderr))
        return parse_labels(done.stdout)

    def card(self, ctx):
        payload = ctx.payload if isinstance(ctx.payload, dict) else {}
        labels = (ctx.action_input or {}).get("labels") or {}
        names = sorted({n for per in labels.values() if isinstance(per, dict) for n in per}) \
            if isinstance(labels, dict) else []
        return {"title": "Camio event on %s" % payload.get("camera", "?"),
                "facts": [("camera", str(payload.get("camera", ""))), ("user", str(payload.get("user_id", ""))),
                          ("images", str(len(payload.get("images") or []))),
                          ("labels", ", ".join(names) or "none")],
                "text": ""}


# -- payload shape ---------------------------------------------------------------------------------------

def payload_problem(payload):
    """Why ``payload`` is not a Camio task (a short reason), or None when it is one."""
    if not isinstance(payload, dict):
        return "body is not a JSON object"
    url = payload.get("callback_url")
    if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
        return "callback_url is missing or not an http(s) URL"
    images = payload.get("images")
    if not isinstance(images, list) or not images:
        return "images[] is missing or empty"
    if len(images) > MAX_IMAGES:
        return "more than %d images" % MAX_IMAGES
    for n, image in enumerate(images):
        if not isinstance(image, dict):
            return "images[%d] is not an object" % n
        if timestamp_key(image.get("timestamp")) is None:
            return "images[%d].timestamp is neither a string nor {meta_class, date}" % n
        if decode_image(image.get("image_b64")) is None:
            return "images[%d].image_b64 is missing or not base64" % n
    return None


def without_pixels(payload):
    """What is stored as the event's payload: the task without image_b64 (the raw body keeps the
    images), so event listings, the pending list and Teams cards stay small."""
    small = dict(payload)
    small["images"] = [{k: v for k, v in image.items() if k != "image_b64"} for image in payload["images"]]
    return small


def full_task(body):
    """The whole task, images included, from the stored request body (checked by accept already)."""
    try:
        task = json.loads(body.decode("utf-8"))
    except (AttributeError, UnicodeDecodeError, ValueError):
        task = None
    problem = payload_problem(task)
    if problem:
        raise Fail("stored body is not a Camio task: %s" % problem)
    return task


def timestamp_key(timestamp):
    """The label key of an image: the timestamp string, or the ``date`` of the {meta_class, date} form."""
    if isinstance(timestamp, dict):
        timestamp = timestamp.get("date")
    return timestamp if isinstance(timestamp, str) and timestamp else None


def decode_image(text):
    """The bytes of a standard-base64 string (line breaks allowed), or None."""
    if not isinstance(text, str) or not text:
        return None
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        return None
    return data or None


def write_images(workdir, images):
    """Write each image as NN.jpg/NN.png; return [(timestamp key, path or None if not JPEG/PNG)]."""
    out = []
    for n, image in enumerate(images):
        data = decode_image(image.get("image_b64")) or b""
        kind = image_kind(data)
        path = None
        if kind:
            path = os.path.join(workdir, "%02d.%s" % (n, kind))
            with open(path, "wb") as f:
                f.write(data)
        out.append((timestamp_key(image.get("timestamp")), path))
    return out


def image_kind(data):
    """'jpg' or 'png' from the magic bytes; None for anything else (never handed to ffmpeg)."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    return None


# -- the stats labeler -------------------------------------------------------------------------------------

def stats_labels(images, timeout, log, stopping):
    """{timestamp: {label: {"probability": p, "polygon": []}}} for [(timestamp, path)] in event order.
    Gives up with Retry when hookd is stopping, so a long event does not hold up the shutdown."""
    labels = {}
    previous = None
    for key, path in images:
        if stopping.is_set():
            raise Retry("hookd is stopping; labelling starts again after the restart")
        found = labels.setdefault(key, {})
        if path is None:
            log.warning("image %s is not a JPEG or PNG; no labels for it", key)
            previous = None
            continue
        stats = ffmpeg_stats(ffmpeg_input(path) + ["-vf", STATS_FILTER], timeout)
        if stats is None:
            log.warning("ffmpeg could not decode image %s; no labels for it", key)
            previous = None
            continue
        merge(found, still_labels(stats))
        if previous is not None:
            diff = ffmpeg_stats(ffmpeg_input(previous) + ffmpeg_input(path) +
                                ["-filter_complex", DIFF_FILTER], timeout)
            if diff is not None and diff["YAVG"] > MOTION_DIFF:
                merge(found, {"motion": label(past(diff["YAVG"], MOTION_DIFF, MOTION_FULL))})
        previous = path
    return labels


def still_labels(stats):
    """Labels of one image from its signalstats: night, dark, bright."""
    found = {}
    if stats["SATAVG"] < NIGHT_SATURATION:
        found["night"] = label(past(stats["SATAVG"], NIGHT_SATURATION, 0.0))
    if stats["YAVG"] < DARK_LUMA:
        found["dark"] = label(past(stats["YAVG"], DARK_LUMA, 0.0))
    if stats["YAVG"] > BRIGHT_LUMA:
        found["bright"] = label(past(stats["YAVG"], BRIGHT_LUMA, 255.0))
    return found


def past(value, threshold, full):
    """0.5 at ``threshold``, rising linearly to 1.0 at ``full`` (which may lie below the threshold)."""
    share = (value - threshold) / (full - threshold)
    return round(min(1.0, 0.5 + 0.5 * max(0.0, share)), 3)


def label(probability):
    return {"probability": probability, "polygon": []}


def merge(found, new):
    """Add labels, keeping the higher probability (two images may share a timestamp)."""
    for name, value in new.items():
        if name not in found or found[name]["probability"] < value["probability"]:
            found[name] = value


def ffmpeg_input(path):
    """One input, forced to the image demuxer its magic bytes named: no probing, no other protocol."""
    demuxer = "png_pipe" if path.endswith(".png") else "jpeg_pipe"
    return ["-protocol_whitelist", "file", "-max_pixels", str(MAX_PIXELS), "-f", demuxer, "-i", path]


def ffmpeg_stats(args, timeout):
    """Run ffmpeg with ``args`` + one frame to the null muxer; the first frame's signalstats, or None
    when ffmpeg could not decode the input. Raises Retry on a timeout, Fail if ffmpeg is missing."""
    argv = [shutil.which("ffmpeg") or "ffmpeg", "-nostdin", "-hide_banner", "-v", "error",
            "-threads", "1"] + args + ["-frames:v", "1", "-f", "null", "-"]
    try:
        done = proc.run(argv, timeout=timeout)
    except OSError as e:
        raise Fail("ffmpeg cannot be started: %s" % (e.strerror or e))
    if done.timed_out:
        raise Retry("ffmpeg took longer than %gs" % timeout)
    stats = {}
    for name, value in STAT_LINE.findall(done.stdout.decode("ascii", "replace")):
        stats.setdefault(name, float(value))
    if done.returncode != 0 or "YAVG" not in stats or "SATAVG" not in stats:
        return None
    return stats


# -- the command labeler -------------------------------------------------------------------------------------

def parse_labels(stdout):
    """The labels a user's program printed: a JSON object or list, posted as given. A whole Camio body
    ({"status": ..., "labels": ...}) is unwrapped to its labels."""
    try:
        labels = json.loads(stdout.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise Fail("labeler printed something that is not JSON: %r" % stdout[:80])
    if isinstance(labels, dict) and set(labels) == {"status", "labels"}:
        labels = labels["labels"]
    if not isinstance(labels, (dict, list)):
        raise Fail("labeler printed JSON that is neither an object nor a list")
    return labels


def tail(data, limit=200):
    text = data.decode("utf-8", "replace").strip()
    return text[-limit:] if text else "(no stderr)"


# -- sqlite: labels kept across retries, pending tasks ------------------------------------------------------

def cached_labels(conn, event_id):
    row = conn.execute("SELECT labels FROM camio_labels WHERE event_id = ?", (event_id,)).fetchone()
    return json.loads(row[0]) if row else None


def remember_labels(conn, event_id, labels):
    conn.execute("INSERT OR REPLACE INTO camio_labels (event_id, labels) VALUES (?, ?)",
                 (event_id, json.dumps(labels)))


def forget_labels(conn, event_id):
    conn.execute("DELETE FROM camio_labels WHERE event_id = ?", (event_id,))
    # Rows of events that went dead and were pruned since: nothing else would ever remove them.
    conn.execute("DELETE FROM camio_labels WHERE event_id NOT IN (SELECT id FROM events)")


def pending_tasks(conn, route):
    """[{id, camera, user_id, received_at, status}] of this route's events not finished yet, oldest first."""
    args = (route,) + PENDING + (MAX_LISTED,)
    try:
        rows = conn.execute(
            "SELECT id, json_extract(payload, '$.camera'), json_extract(payload, '$.user_id'), received_at,"
            " status FROM events WHERE route = ? AND status <> 'done' AND status IN (?, ?, ?)"
            " ORDER BY id LIMIT ?", args).fetchall()
    except sqlite3.OperationalError:  # an SQLite built without JSON1: parse in Python
        rows = [(i, *_who(p), r, s) for i, p, r, s in conn.execute(
            "SELECT id, payload, received_at, status FROM events WHERE route = ? AND status <> 'done'"
            " AND status IN (?, ?, ?) ORDER BY id LIMIT ?", args)]
    return [{"id": i, "camera": camera, "user_id": user, "received_at": iso(received), "status": status}
            for i, camera, user, received, status in rows]


def _who(payload_text):
    try:
        payload = json.loads(payload_text)
    except (TypeError, ValueError):
        return None, None
    return (payload.get("camera"), payload.get("user_id")) if isinstance(payload, dict) else (None, None)

