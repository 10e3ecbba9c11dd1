"""Generic hooks: ``[hook:NAME]`` sections, each a verified ``POST /hooks/NAME`` from any sender.

Strategy: one Handler per ``[hook:NAME]`` section. ``accept`` checks the request with the section's
``verify`` scheme over the raw bytes (hookd_core/verify.py: standard-webhooks, github, stripe, shopify,
hmac, token, none), then the optional ``filter`` (``json:dotted.path == value``, ``!=``,
``header:NAME == value``, several joined by `` and ``); an event the filter does not match is answered
200 ``{"status": "ignored"}`` and nothing is stored. The dedupe key is the section's ``dedupe`` rule, or
the sender's delivery id (``webhook-id``, ``X-GitHub-Delivery``, ...), or the body hash. The body is
stored as received; a JSON body is also the event's payload. A hook has no work of its own: ``run`` does
nothing and the generic actions (command, forward, teams) do the work.
"""

import json
import re

from hookd_core import verify
from hookd_core.api import Integration, NewEvent, Response, dedupe_keyer, json_or_none

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # the NAME is a URL path segment
CONDITION_RE = re.compile(r"^\s*(json|header):([^\s=!]+)\s*(==|!=)\s*(.*?)\s*$")


class Condition:
    """One ``SOURCE:NAME OP VALUE`` test of a filter."""

    def __init__(self, source, name, op, value):
        self.source, self.name, self.op, self.value = source, name, op, value

    def holds(self, payload, headers):
        actual = self._actual(payload, headers)
        equal = actual is not None and actual == self.value
        return equal if self.op == "==" else not equal

    def _actual(self, payload, headers):
        if self.source == "header":
            return verify.header(headers, self.name)
        value = payload
        for part in self.name.split("."):
            if not isinstance(value, dict) or part not in value:
                return None
            value = value[part]
        return value if isinstance(value, str) else json.dumps(value)


def parse_filter(text):
    """``filter`` text → list of Conditions (all must hold); ValueError with the reason if malformed."""
    conditions = []
    for part in re.split(r"\s+and\s+", (text or "").strip()) if (text or "").strip() else []:
        m = CONDITION_RE.match(part)
        if not m:
            raise ValueError("filter %r is not 'json:path == value' or 'header:NAME != value'" % part)
        value = m.group(4)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        conditions.append(Condition(m.group(1), m.group(2), m.group(3), value))
    return conditions


class Handler(Integration):
    SECTION = "hook:"
    KEYS = {
        "verify": "",
        "secret": "",
        "tolerance": "300",
        "signature.header": "",
        "signature.prefix": "",
        "signature.encoding": "hex",
        "signature.algorithm": "sha256",
        "signature.message": "{body}",
        "token.header": "Authorization",
        "allow_unsigned": "false",
    }
    SECRET_KEYS = ("secret",)

    def __init__(self, name, conf, app):
        super().__init__(name, conf, app)
        self.hook = name[len(self.SECTION):] if name.startswith(self.SECTION) else name
        self.route = "/hooks/" + self.hook
        self.check_signature = verify.checker(conf)
        rule = (conf.get("dedupe") or "").strip() or verify.default_dedupe(conf.get("verify"))
        # the section's rule, else the scheme's other name for its delivery id, else the body hash
        self._keys = tuple(dedupe_keyer(r) for r in (rule, verify.DEFAULT_DEDUPE_ALIASES.get(rule),
                                                      None if rule == "none" else "body") if r)
        try:
            self.conditions, self.filter_problem = parse_filter(conf.get("filter")), None
        except ValueError as e:
            self.conditions, self.filter_problem = [], str(e)

    def check(self):
        problems = verify.check(self.conf)
        if not NAME_RE.match(self.hook):
            problems.append("hook name %r must be letters, digits, '_', '.', '-' (it is a URL path)"
                            % self.hook)
        if self.filter_problem:
            problems.append(self.filter_problem)
        return ["[%s] %s" % (self.name, p) for p in problems]

    def accept(self, req):
        self.check_signature(req.headers, req.body)
        if self.conditions:  # parse only when a filter needs it; the worker parses the stored body
            payload = json_or_none(req.body)
            if not all(c.holds(payload, req.headers) for c in self.conditions):
                return Response(200, {"status": "ignored", "reason": "filter did not match"})
        return [NewEvent(None, self.dedupe(req))]  # payload None: the body; by position, cheaper than keywords

    def dedupe(self, req):
        """The section's rule, else the scheme's delivery id; a missing id falls back to the body hash."""
        for key_of in self._keys:
            key = key_of(req)
            if key is not None:
                return key
        return None

    def card(self, ctx):
        facts = [("hook", self.hook), ("event", ctx.id), ("received", ctx.received_at)]
        payload = ctx.payload if isinstance(ctx.payload, dict) else {}
        for key in ("type", "event", "action"):
            if isinstance(payload.get(key), (str, int)):
                facts.append((key, payload[key]))
        github_event = (ctx.headers or {}).get("x-github-event")
        if github_event:
            facts.append(("x-github-event", github_event))
        return {"title": "hookd: %s received an event" % self.route, "facts": facts, "text": ""}
