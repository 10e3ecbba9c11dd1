"""The generic actions any section can run after its integration's own work: command, forward, teams.

Strategy: each action is ``fn(ctx, integration) -> note or None`` and ends like a job does: return when
done, raise ``Retry`` (backoff, then dead) or ``Fail`` (dead at once). The core calls
``ACTIONS[name](ctx, integration)`` for each name in ``integration.actions()``, or for ``command``
``STEPS[name]``, the same as a generator that hands its started program to the worker to wait on (beside
other jobs' programs: ``proc.wait``) and returns the note. ``command`` runs a program
through ``proc.run`` (no shell, its whole tree killed on timeout, output capped as it arrives) with the
event JSON on stdin and a clean environment (``job_env``: the HOOKD_* values and ``command.env`` names);
``forward`` POSTs the original bytes through ``client.request`` (one deadline for the whole call, never
a redirect followed; of the answer, whatever its size, only the first ANSWER_KEPT bytes are kept, and
at most client.KEEP_DRAIN more are read); ``teams`` posts the integration's ``card(ctx)`` as a Workflows Adaptive Card or a
legacy MessageCard (https://learn.microsoft.com/en-us/microsoftteams/platform/webhooks-and-connectors/
how-to/connectors-using). Both map the answer with ``client.check``. Notes and errors never contain
secrets: program output is trimmed and the section's secret values are masked; URLs are logged without
their query (Teams URLs carry a signature).
"""

import base64
import functools
import json
import re
import shlex
import urllib.parse

from . import client, proc
from .api import Fail, Retry

MAX_NOTE = 300          # characters of a program's stderr kept in last_error
TEAMS_FORMATS = ("adaptive", "messagecard")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ANSWER_KEPT = 4096      # bytes of a forward's or a Teams post's answer kept: only its status and start are read


# -- command -------------------------------------------------------------------------------------------

def event_document(ctx):
    """What a command gets on stdin: ``ctx.action_input`` if the integration set one, else the event."""
    if getattr(ctx, "action_input", None) is not None:
        return ctx.action_input
    body = ctx.body or b""
    try:
        text, encoding = body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(body).decode("ascii"), "base64"
    return {"id": ctx.id, "route": ctx.route, "received_at": ctx.received_at, "attempt": ctx.attempt,
            "headers": ctx.headers, "content_type": ctx.content_type, "payload": ctx.payload,
            "body": text, "body_encoding": encoding}


def command_steps(ctx, integration):
    """Run ``command`` with the event JSON on stdin; exit 0 is done, anything else a Retry. A generator
    (``STEPS``): it yields the started program (``proc.Running``) for its caller to ``proc.wait`` on,
    alone (``proc.drive``) or beside other jobs' programs, and returns the note."""
    conf = ctx.conf
    return (yield from command_program(conf.get("command") or "", event_document(ctx),
                                       conf.float("command.timeout"), job_env(ctx, integration),
                                       _secret_values(integration)))


def run_command(text, document, timeout, env, secrets=()):
    """Run the command line ``text`` (split like a shell would, no shell) with ``document`` as JSON on
    stdin, its stdout on /dev/null (nothing reads it; stderr gives the reason of a failure) and ``env``
    as its whole environment (``proc.child_env``: clean). Exit 0 returns a note; an empty or unsplittable
    line is Fail; a start failure, a timeout or another exit is Retry (its last stderr line, with the
    ``secrets`` masked, in the reason)."""
    return proc.drive(command_program(text, document, timeout, env, secrets))


def command_program(text, document, timeout, env, secrets=()):
    """``run_command`` as steps (see ``command_steps``)."""
    try:
        argv = list(_split(text))
    except ValueError as e:
        raise Fail("command cannot be split into arguments: %s" % e)
    if not argv:
        raise Fail("command is empty")
    stdin = json.dumps(document).encode("utf-8")
    try:
        running = proc.start(argv, stdin=stdin, timeout=timeout, env=env, keep_stdout=False)
    except OSError as e:
        raise _not_started(argv, e)
    yield running
    if running.error is not None:  # not started, or the wait for it failed
        raise _not_started(argv, running.error) if running.child is None else running.error
    done = running.finished
    if done.timed_out:
        raise Retry("command timed out after %gs; its process group was killed" % timeout)
    if done.returncode != 0:
        how = ("killed by signal %d" % -done.returncode) if done.returncode < 0 else \
            "exited %d" % done.returncode
        detail = _last_line(done.stderr, secrets)
        raise Retry("command %s%s" % (how, ": " + detail if detail else ""))
    return "command exited 0"


def _not_started(argv, error):
    return Retry("command %s could not start: %s" % (argv[0], getattr(error, "strerror", None) or error))


@functools.lru_cache(maxsize=64)
def _split(text):
    """A command line's arguments, split like a shell would (a section runs the same line every job)."""
    return tuple(shlex.split(text))


def job_env(ctx, integration, **more):
    """The clean environment of a job's program (proc.child_env): the job's HOOKD_* values (and
    ``more``), plus the names the section lists in ``command.env`` unless they hold a secret."""
    names = ctx.conf.list("command.env")
    secrets = []
    core = getattr(integration, "core", None)
    if names:  # the secrets are only looked for in the values of the names passed on
        secrets = _secret_values(integration) + (core.secrets() if core is not None else [])
    hookd_vars = dict({"HOOKD_EVENT_ID": str(ctx.id), "HOOKD_ROUTE": str(ctx.route),
                       "HOOKD_ATTEMPT": str(ctx.attempt)}, **more)
    return proc.child_env(hookd_vars, names, secrets)


def _last_line(data, secrets):
    """The last non-empty line of a program's output, trimmed, with secret values masked."""
    lines = [ln.strip() for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    line = lines[-1] if lines else ""
    for secret in secrets:
        line = line.replace(secret, "***")
    return line[:MAX_NOTE]


def _secret_values(integration):
    """Every configured secret of the section (each space-separated part too), for masking."""
    values = []
    for key in getattr(integration, "SECRET_KEYS", ()):
        raw = integration.conf.get(key) or ""
        values += [v for v in [raw] + raw.split() if len(v) >= 4]
    return sorted(set(values), key=len, reverse=True)


# -- forward -------------------------------------------------------------------------------------------

def forward(ctx, integration):
    """POST the original body bytes and content type (or ``action_input`` as JSON) to ``forward``."""
    conf = ctx.conf
    url = conf.get("forward")
    if getattr(ctx, "action_input", None) is not None:
        body, ctype = json.dumps(ctx.action_input).encode("utf-8"), "application/json"
    else:
        body, ctype = ctx.body or b"", ctx.content_type or "application/octet-stream"
    headers = {"Content-Type": ctype, "User-Agent": "hookd", "X-Hookd-Event-Id": str(ctx.id),
               "X-Hookd-Route": str(ctx.route), "X-Hookd-Attempt": str(ctx.attempt)}
    reply = client.request("POST", url, headers=headers, body=body, timeout=conf.float("forward.timeout"),
                           keep_alive=True, keep=ANSWER_KEPT)
    where = client.redact_url(url)
    # Any answer but 2xx is retried (the receiver may be down or redeploying); credentials refused
    # (401/403) are dead at once, as for every outbound call.
    client.check(reply, "forward to %s" % where, refused="the forward URL's credentials", other=Retry)
    return "forwarded to %s: %d" % (where, reply.status)


# -- Microsoft Teams -----------------------------------------------------------------------------------

def adaptive_card(card):
    """A Workflows "When a Teams webhook request is received" body carrying one Adaptive Card."""
    body = [{"type": "TextBlock", "text": card.get("title") or "hookd", "weight": "Bolder",
             "size": "Medium", "wrap": True}]
    if card.get("text"):
        body.append({"type": "TextBlock", "text": card["text"], "wrap": True})
    facts = [{"title": str(n), "value": str(v)} for n, v in card.get("facts") or ()]
    if facts:
        body.append({"type": "FactSet", "facts": facts})
    content = {"$schema": "http://adaptivecards.io/schemas/adaptive-card.json", "type": "AdaptiveCard",
               "version": "1.2", "body": body}
    return {"type": "message", "attachments": [
        {"contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": None, "content": content}]}


def message_card(card):
    """A legacy Office 365 connector MessageCard (Teams needs ``summary`` or ``text``)."""
    title = card.get("title") or "hookd"
    out = {"@type": "MessageCard", "@context": "http://schema.org/extensions", "summary": title,
           "themeColor": "0076D7", "title": title}
    if card.get("text"):
        out["text"] = card["text"]
    facts = [{"name": str(n), "value": str(v)} for n, v in card.get("facts") or ()]
    if facts:
        out["sections"] = [{"facts": facts}]
    return out


def post_teams(url, fmt, card, timeout=30):
    """Post ``card`` ({"title", "facts": [(name, value)], "text"}) to a Teams webhook URL.
    Any 2xx is success (legacy answers 200 "1", Workflows 202 empty); otherwise ``client.check``'s
    mapping (401/403 and other 4xx dead, 408/429/5xx/network retried). Returns a note."""
    if fmt not in TEAMS_FORMATS:
        raise Fail("teams.format must be adaptive or messagecard, not %r" % fmt)
    doc = adaptive_card(card) if fmt == "adaptive" else message_card(card)
    reply = client.request("POST", url, headers={"Content-Type": "application/json", "User-Agent": "hookd"},
                           body=json.dumps(doc).encode("utf-8"), timeout=timeout, keep=ANSWER_KEPT)
    host = urllib.parse.urlsplit(url).hostname
    if reply.ok and b"HTTP error 429" in reply.body[:1000]:
        raise Retry("teams (%s) throttled: connector answered 2xx with an HTTP 429 text" % host, after=60)
    client.check(reply, "teams (%s)" % host, refused="teams.url (the webhook was deleted or its signature changed)")
    return "teams card posted (%s): %d" % (host, reply.status)


def teams(ctx, integration):
    """Post ``integration.card(ctx)`` to ``teams.url`` in ``teams.format``."""
    conf = ctx.conf
    fmt = (conf.get("teams.format") or "adaptive").strip().lower()
    return post_teams(conf.get("teams.url"), fmt, integration.card(ctx))


ACTIONS = {"forward": forward, "teams": teams}  # run to their end on the caller's thread
STEPS = {"command": command_steps}  # hand their program to the caller to wait on


def check(conf):
    """Problems with a section's generic action keys, one string each."""
    problems = []
    try:
        if conf.get("command") and not shlex.split(conf.get("command")):
            problems.append("command is empty")
    except ValueError as e:
        problems.append("command cannot be split into arguments: %s" % e)
    for name in conf.list("command.env"):
        if name in proc.NEVER or not ENV_NAME.match(name):
            problems.append("command.env: %s cannot be passed to a program" % name)
    try:
        if int(conf.get("command.batch") or 1) < 1:
            problems.append("command.batch must be 1 or more")
    except ValueError:
        problems.append("command.batch must be a whole number")
    for key in ("command.timeout", "forward.timeout"):
        try:
            if float(conf.get(key) or 1) <= 0:
                problems.append("%s must be more than 0" % key)
        except ValueError:
            problems.append("%s must be a number of seconds" % key)
    for key in ("forward", "teams.url"):
        value = conf.get(key)
        if value and urllib.parse.urlsplit(value).scheme not in ("http", "https"):
            problems.append("%s must be an http:// or https:// URL" % key)
    if (conf.get("teams.format") or "adaptive").strip().lower() not in TEAMS_FORMATS:
        problems.append("teams.format must be adaptive or messagecard")
    return problems
