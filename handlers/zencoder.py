"""Zencoder: submit encoding jobs (``zencoder-submit``) and track their outputs from notifications.

Wire contract. ``POST {api.url}/jobs`` with header ``Zencoder-Api-Key`` and a JSON job (``input``,
``outputs[]`` with ``size: "WxH"``, ``notifications`` URLs) answers 201 ``{"id", "outputs": [{"id",
"url"}]}``; 403 "Rate Limit Exceeded" and 5xx mean "try later" (zencoder/zencoder-py ``zencoder/core.py``;
https://zencoder.support.brightcove.com/general-information/getting-notifications-when-videos-are-finished.html).
Zencoder then POSTs a JSON notification ``{"job": {"id", "state"}, "input": {...}, "outputs": [{"id",
"state", "format", "width", "height", "file_size_in_bytes", "duration_in_ms", ...}]}`` to each URL
(https://zencoder.support.brightcove.com/encoding-settings/general/encoding-settings-notifications.html);
``format`` is ``mpeg4`` for MP4, and a notification may repeat. Zencoder does not sign it: the receiver
checks ``X-Zencoder-Notification-Secret`` (armadillica/pillar ``pillar/api/encoding.py``) or the password
of HTTP basic auth in the notification URL (401 otherwise); a job hookd never submitted is 404.

Strategy: ``zencoder-submit`` creates the job through ``ZencoderApi`` (retrying 5xx, the rate-limit 403
and network errors a few times) and records the file and one variation per requested output, all
``pending``. ``accept`` checks the secret with ``verify.secret_header``, parses with ``Request.json`` and
refuses unknown jobs. The dedupe key is the job id, its state and each output's id and state, so a
repeated notification is a duplicate even when a timestamp in it changed. ``run`` applies the
notification in one write transaction: the job status follows ``job.state`` but never leaves
``finished``/``failed``/``cancelled``; each output updates the variation it belongs to (by output id,
else format and width, else format alone). The event that first moves a job into ``finished`` or
``failed`` hands a JSON summary of the file to the section's generic actions; every other one skips them.
"""

import argparse
import hashlib
import json
import os
import re
import sqlite3
import sys
import time

from hookd_core import client, verify
from hookd_core.api import (REQUIRED, BadPayload, Fail, Integration, NewEvent, NotFound, Reject, Response,
                            Retry, iso)

ROUTE = "/zencoder/notifications"
JOB_PATH = re.compile(r"^/zencoder/jobs/([^/]+)$")
FINAL = ("finished", "failed", "cancelled")
NOTIFY_ON = ("finished", "failed")  # a job moving into one of these runs the actions, once
FORMAT_ALIASES = {"mpeg4": "mp4"}  # Zencoder reports mp4 outputs as "mpeg4" (pillar maps it the same way)
MAX_ERROR = 2000  # characters of an output's error text kept
OUTPUT_SPEC = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_-]{0,31}):([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")
TEMPLATE_FIELDS = ("name", "format", "width", "height", "n")

SCHEMA = """
CREATE TABLE IF NOT EXISTS zencoder_file (
    job_id INTEGER PRIMARY KEY,          -- Zencoder's job id
    input TEXT NOT NULL,                 -- the input URL given to zencoder-submit
    status TEXT NOT NULL,                -- pending | waiting | processing | finished | failed | cancelled
    notified_event INTEGER,              -- the event that moved the job into finished/failed
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS zencoder_variation (
    job_id INTEGER NOT NULL REFERENCES zencoder_file(job_id),
    position INTEGER NOT NULL,           -- 1-based, in the order of --output
    format TEXT NOT NULL,                -- mp4, webm, ... (never mpeg4)
    width INTEGER,
    height INTEGER,
    length INTEGER,                      -- bytes (file_size_in_bytes)
    duration REAL,                       -- seconds
    state TEXT NOT NULL,
    error TEXT,                          -- Zencoder's error text for a failed output
    output_id INTEGER,                   -- Zencoder's output id, from the job creation answer
    url TEXT,                            -- where Zencoder wrote the output
    updated_at TEXT NOT NULL,
    PRIMARY KEY (job_id, position)
);
"""

VARIATION_COLUMNS = ("format", "width", "height", "length", "duration", "state", "error", "output_id",
                     "url")
UPDATABLE = ("state", "length", "width", "height", "duration", "output_id", "url", "error")  # update order


def canonical_format(fmt):
    fmt = str(fmt or "").strip().lower()
    return FORMAT_ALIASES.get(fmt, fmt)


# -- reading a notification ----------------------------------------------------------------------------

def notification_outputs(doc):
    """The outputs of a notification: ``outputs`` (a list), or a single ``output`` object."""
    outputs = doc.get("outputs")
    if outputs is None and isinstance(doc.get("output"), dict):
        outputs = [doc["output"]]
    if outputs is None:
        return []
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise BadPayload("outputs must be a list of objects")
    return outputs


def parse_notification(doc):
    """(job_id, job_state, outputs) from a parsed notification, or BadPayload (422)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("job"), dict):
        raise BadPayload("a Zencoder notification needs a job object")
    job = doc["job"]
    job_id = job.get("id")
    if not isinstance(job_id, int) or isinstance(job_id, bool) or job_id <= 0:
        raise BadPayload("job.id must be a positive integer")
    state = job.get("state")
    if not isinstance(state, str) or not state.strip():
        raise BadPayload("job.state must be a non-empty string")
    return job_id, state.strip().lower(), notification_outputs(doc)


def notification_key(job_id, state, outputs):
    """Job id + job state + each output's id and state: the same news twice is a duplicate."""
    parts = sorted("%s=%s" % (o.get("id"), o.get("state")) for o in outputs)
    digest = hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:32]
    return "zencoder:%d:%s:%s" % (job_id, state, digest)


def as_int(value):
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def seconds(ms):
    return ms / 1000.0 if isinstance(ms, (int, float)) and not isinstance(ms, bool) else None


def error_text(output):
    """The error Zencoder gives for a failed output (``error_message``, else ``error``), bounded."""
    err = output.get("error_message") or output.get("error")
    if err is None:
        return None
    if not isinstance(err, str):
        err = json.dumps(err, sort_keys=True)
    return err[:MAX_ERROR]


# -- the database side -----------------------------------------------------------------------------------

def find_variation(rows, output):
    """The variation row an output belongs to: same output id, else same format and width, else (when
    the output has no width, or only one variation has that format) same format. None if no match."""
    out_id = as_int(output.get("id"))
    if out_id is not None:
        for row in rows:
            if row["output_id"] == out_id:
                return row
    fmt, width = canonical_format(output.get("format")), as_int(output.get("width"))
    same_format = [r for r in rows if r["format"] == fmt]
    if width is not None:
        for row in same_format:
            if row["width"] == width:
                return row
    if width is None or len(same_format) == 1:
        return same_format[0] if same_format else None
    return None


def output_changes(row, output, input_ms):
    """Column -> new value for a variation from one output; {} when the variation is already final."""
    state = str(output.get("state") or "").strip().lower() or row["state"]
    if row["state"] in FINAL:
        return {}
    changes = {"state": state,
               "length": as_int(output.get("file_size_in_bytes")),
               "width": as_int(output.get("width")),
               "height": as_int(output.get("height")),
               "duration": seconds(output.get("duration_in_ms")) or seconds(input_ms),
               "output_id": as_int(output.get("id")),
               "url": output.get("url") if isinstance(output.get("url"), str) else None}
    if state == "failed":
        changes["error"] = error_text(output)
    return {k: v for k, v in changes.items() if v is not None}


def load_variations(conn, job_id):
    cur = conn.execute("SELECT position, format, width, height, length, duration, state, error,"
                       " output_id, url FROM zencoder_variation WHERE job_id = ? ORDER BY position",
                       (job_id,))
    return [dict(zip(("position",) + VARIATION_COLUMNS, row)) for row in cur.fetchall()]


def update_variation(conn, job_id, position, changes, stamp):
    """Write ``changes`` (a subset of UPDATABLE) to one variation; absent columns keep their value."""
    conn.execute("UPDATE zencoder_variation SET state = coalesce(?, state), length = coalesce(?, length),"
                 " width = coalesce(?, width), height = coalesce(?, height),"
                 " duration = coalesce(?, duration), output_id = coalesce(?, output_id),"
                 " url = coalesce(?, url), error = coalesce(?, error), updated_at = ?"
                 " WHERE job_id = ? AND position = ?",
                 [changes.get(name) for name in UPDATABLE] + [stamp, job_id, position])


def file_summary(conn, job_id):
    """The JSON view of one file: job_id, status, input, timestamps and its variations; None if unknown."""
    row = conn.execute("SELECT job_id, status, input, created_at, updated_at FROM zencoder_file"
                       " WHERE job_id = ?", (job_id,)).fetchone()
    if row is None:
        return None
    summary = dict(zip(("job_id", "status", "input", "created_at", "updated_at"), row))
    summary["variations"] = [{k: v for k, v in var.items() if k != "position"}
                             for var in load_variations(conn, job_id)]
    return summary


def apply_notification(conn, event_id, doc):
    """Apply one notification inside the caller's transaction. Returns (summary, notify, note):
    ``notify`` is True when this event is the one that moved the job into finished/failed."""
    job_id, state, outputs = parse_notification(doc)
    row = conn.execute("SELECT status, notified_event FROM zencoder_file WHERE job_id = ?",
                       (job_id,)).fetchone()
    if row is None:
        raise Fail("job %d is not in zencoder_file" % job_id)
    old, notified = row
    stamp = iso(time.time())
    moved = old not in FINAL and state in NOTIFY_ON
    if old not in FINAL and state != old:
        conn.execute("UPDATE zencoder_file SET status = ?, updated_at = ?,"
                     " notified_event = CASE WHEN ? THEN ? ELSE notified_event END WHERE job_id = ?",
                     (state, stamp, moved, str(event_id), job_id))
    media = doc.get("input") if isinstance(doc.get("input"), dict) else {}
    touched = apply_outputs(conn, job_id, outputs, media.get("duration_in_ms"), stamp)
    notify = moved or (old in NOTIFY_ON and notified is not None and str(notified) == str(event_id))
    summary = file_summary(conn, job_id)
    note = "job %d %s -> %s, %d/%d outputs applied" % (job_id, old, summary["status"], touched,
                                                       len(outputs))
    return summary, notify, note


def apply_outputs(conn, job_id, outputs, input_ms, stamp):
    """Update the variations from ``outputs``; returns how many variations changed."""
    rows = load_variations(conn, job_id)
    touched = 0
    for output in outputs:
        row = find_variation(rows, output)
        if row is None:
            continue
        changes = output_changes(row, output, input_ms)
        if changes:
            update_variation(conn, job_id, row["position"], changes, stamp)
            row.update(changes)
            touched += 1
    return touched


def record_job(conn, job_id, input_url, outputs, answer_outputs):
    """Insert the file and one pending variation per requested output (zencoder-submit)."""
    stamp = iso(time.time())
    conn.execute("INSERT INTO zencoder_file (job_id, input, status, created_at, updated_at)"
                 " VALUES (?, ?, 'pending', ?, ?)", (job_id, input_url, stamp, stamp))
    for position, (fmt, width, height) in enumerate(outputs, 1):
        answer = answer_outputs[position - 1] if position <= len(answer_outputs) else {}
        out_id = as_int(answer.get("id")) if isinstance(answer, dict) else None
        url = answer.get("url") if isinstance(answer, dict) and isinstance(answer.get("url"), str) else None
        conn.execute("INSERT INTO zencoder_variation (job_id, position, format, width, height, state,"
                     " output_id, url, updated_at) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?)",
                     (job_id, position, fmt, width, height, out_id, url, stamp))


# -- zencoder-submit -------------------------------------------------------------------------------------

class SubmitError(Exception):
    """A problem zencoder-submit explains in one line and exits 1 for."""


def output_spec(text):
    """argparse type for FORMAT:WIDTHxHEIGHT -> (format, width, height)."""
    m = OUTPUT_SPEC.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError("%r is not FORMAT:WIDTHxHEIGHT (e.g. mp4:1920x1080)" % text)
    return canonical_format(m.group(1)), int(m.group(2)), int(m.group(3))


def submit_parser():
    p = argparse.ArgumentParser(prog="hookd.py zencoder-submit",
                                description="Create a Zencoder encoding job and record it.")
    p.add_argument("input", metavar="INPUT_URL", help="the file Zencoder should fetch (s3://, gcs://, https://)")
    p.add_argument("--output", metavar="FORMAT:WIDTHxHEIGHT", type=output_spec, action="append",
                   required=True, help="one output variation; repeat for several")
    p.add_argument("--test", action="store_true", help="a Zencoder test job (watermarked, free)")
    p.add_argument("--config", help=argparse.SUPPRESS)  # read by the core; tolerated when passed on
    return p


def output_url(template, input_url, n, fmt, width, height):
    """The output location from the ``output.url`` template, or None when no template is set."""
    if not template:
        return None
    name = os.path.splitext(os.path.basename(input_url.split("?", 1)[0].rstrip("/")))[0] or "output"
    try:
        return template.format(name=name, format=fmt, width=width, height=height, n=n)
    except (KeyError, IndexError, ValueError) as e:
        raise SubmitError("output.url template is not valid (%s); placeholders: %s"
                          % (e, ", ".join("{%s}" % f for f in TEMPLATE_FIELDS)))


def job_body(conf, args):
    """The JSON body of POST /jobs for the parsed arguments."""
    notify = [conf.get("notification.url")]
    outputs = []
    for n, (fmt, width, height) in enumerate(args.output, 1):
        out = {"format": fmt, "size": "%dx%d" % (width, height), "notifications": notify}
        url = output_url(conf.get("output.url"), args.input, n, fmt, width, height)
        if url:
            out["url"] = url
        outputs.append(out)
    return {"input": args.input, "test": bool(args.test), "notifications": notify, "outputs": outputs}


class ZencoderApi(client.Api):
    """Job creation with the API key; only to the configured host."""

    def __init__(self, conf):
        super().__init__(conf.get("api.url"), conf.float("api.timeout"))
        self.api_key = conf.get("api_key")

    def headers(self):
        return {"Zencoder-Api-Key": self.api_key, "Accept": "application/json"}

    def create_job(self, body):
        """``POST /jobs``: the answer's JSON, or Retry (5xx, rate limit, network) / Fail (anything else)."""
        reply = self.call("POST", "/jobs", body)
        if reply.status == 403 and b"Rate Limit" in reply.body:  # Zencoder's rate limit is a 403
            raise Retry("Zencoder answered 403: %s" % client.excerpt(reply.body))
        return client.check(reply, "Zencoder", refused="[zencoder] api_key").json()


def post_job(conf, body):
    """Create the job, trying again with backoff while Zencoder says "later"; returns its JSON."""
    attempts = max(1, conf.int("submit.attempts"))
    delay = conf.float("submit.backoff")
    api = ZencoderApi(conf)
    problem = ""
    for attempt in range(1, attempts + 1):
        if attempt > 1:
            print("zencoder-submit: %s; trying again in %.2gs" % (problem, delay), file=sys.stderr)
            time.sleep(delay)
            delay *= 2
        try:
            return api.create_job(body)
        except Retry as e:
            problem = str(e)
        except Fail as e:
            raise SubmitError(str(e))
    raise SubmitError("%s (gave up after %d attempts)" % (problem, attempts))


def check_submit_conf(conf):
    for key in ("api.url", "api_key", "notification.url"):
        if not conf.get(key):
            raise SubmitError("[zencoder] %s is not set" % key)


def submit(handler, argv):
    """``zencoder-submit INPUT_URL --output FORMAT:WIDTHxHEIGHT ...``: create, record, print the job id."""
    try:
        args = submit_parser().parse_args(argv)
    except SystemExit as e:  # argparse printed the usage or --help
        return e.code if isinstance(e.code, int) else 2
    try:
        conf = handler.conf
        check_submit_conf(conf)
        answer = post_job(conf, job_body(conf, args))
        job_id = as_int(answer.get("id")) if isinstance(answer, dict) else None
        if job_id is None:
            raise SubmitError("Zencoder's answer has no integer job id")
        outputs = answer.get("outputs") if isinstance(answer.get("outputs"), list) else []
        handler.core.write(lambda conn: record_job(conn, job_id, args.input, args.output, outputs))
    except sqlite3.IntegrityError:
        print("zencoder-submit: job %s is already recorded" % job_id, file=sys.stderr)
        return 1
    except (SubmitError, Fail) as e:
        print("zencoder-submit: %s" % e, file=sys.stderr)
        return 1
    print(job_id)
    return 0


# -- the integration -------------------------------------------------------------------------------------

class Handler(Integration):
    """Zencoder notifications in, job and variation status out; ``zencoder-submit`` to create jobs."""

    SECTION = "zencoder"
    KEYS = {
        "api.url": "https://app.zencoder.com/api/v2",
        "api.timeout": "30",
        "api_key": "",
        "notification.secret": REQUIRED,
        "notification.url": "",
        "output.url": "",
        "submit.attempts": "4",
        "submit.backoff": "1",
    }
    SECRET_KEYS = ("api_key", "notification.secret", "notification.url")
    SCHEMA = SCHEMA
    RUNS_REMOTELY = False  # run() updates the encoding jobs kept in this hookd's store
    COMMANDS = {"zencoder-submit": submit}
    route = ROUTE

    def check(self):
        problems = []
        for key in ("api.url", "notification.url"):
            value = self.conf.get(key)
            if value and not re.match(r"^https?://", value):
                problems.append("[%s] %s must be an http(s):// URL" % (self.name, key))
        template = self.conf.get("output.url")
        if template:
            try:
                template.format(**{f: "x" for f in TEMPLATE_FIELDS})
            except (KeyError, IndexError, ValueError) as e:
                problems.append("[%s] output.url: unknown or bad placeholder %s" % (self.name, e))
        return problems

    def accept(self, req):
        verify.secret_header(req.headers, [self.conf.get("notification.secret")],
                             ["X-Zencoder-Notification-Secret", "Authorization"])
        doc = req.json()
        job_id, state, outputs = parse_notification(doc)
        known = self.core.read(lambda conn: conn.execute(
            "SELECT 1 FROM zencoder_file WHERE job_id = ?", (job_id,)).fetchone())
        if not known:
            raise NotFound("Zencoder job %d is not one hookd submitted" % job_id)
        return [NewEvent(doc, notification_key(job_id, state, outputs), "zencoder:%d" % job_id)]

    def run(self, ctx):
        try:
            summary, notify, note = self.core.write(
                lambda conn: apply_notification(conn, ctx.id, ctx.payload))
        except Reject as e:  # a stored payload that is not a notification (a replay of something odd)
            raise Fail(str(e))
        ctx.product("variations", data=summary)
        if notify:
            ctx.action_input = summary
        else:
            ctx.skip_actions = True
        return note

    def admin_get(self, req):
        m = JOB_PATH.match(req.path)
        if not m:
            return None
        job_id = int(m.group(1)) if re.match(r"^[0-9]{1,18}$", m.group(1)) else None
        summary = None if job_id is None else self.core.read(lambda conn: file_summary(conn, job_id))
        if summary is None:
            return Response(404, {"error": "unknown Zencoder job"})
        return Response(200, summary)

    def card(self, ctx):
        summary = ctx.action_input or {}
        facts = [("job", str(summary.get("job_id"))), ("status", str(summary.get("status"))),
                 ("input", str(summary.get("input")))]
        for var in summary.get("variations") or ():
            facts.append(("%s %sx%s" % (var.get("format"), var.get("width"), var.get("height")),
                          "%s, %s bytes" % (var.get("state"), var.get("length"))))
        return {"title": "Zencoder job %s %s" % (summary.get("job_id"), summary.get("status")),
                "facts": facts, "text": ""}
