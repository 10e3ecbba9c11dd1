"""A fake Microsoft Teams for tests: a Workflows webhook and a legacy O365 connector on one loopback port.

Strategy: follows reference/upstreams.md §6.4. ``POST /workflow/<id>`` checks the Workflows envelope
(``type == "message"``, every attachment ``application/vnd.microsoft.card.adaptive`` holding an
AdaptiveCard whose FactSet facts have ``title`` and ``value``) and answers 202 with an empty body.
``POST /legacy/<id>`` checks a MessageCard (an object with ``summary`` or ``text``; facts with ``name``
and ``value``) and answers 200 ``1`` (text/plain); with ``throttle = True`` it answers 200 with the
"HTTP error 429" text, as a throttled connector does. Anything invalid gets 400 and the reason as text.
Every valid card is kept in ``cards`` as (kind, document).
"""

import json

from tests.support import FakeUpstream

ADAPTIVE = "application/vnd.microsoft.card.adaptive"
THROTTLED = "Microsoft Teams endpoint returned HTTP error 429 with ContextId tcid=0,server=msgapi"


class FakeTeams(FakeUpstream):
    """``workflow_url`` and ``legacy_url`` to post to; ``cards``; ``status`` forces an error status."""

    def __init__(self):
        self.cards = []
        self.throttle = False
        self.status = None  # e.g. 429 or 500: answer that instead of validating
        super().__init__(respond=self._respond)
        self.workflow_url = self.url + "/workflow/abc?api-version=2016-06-01&sig=SECRETSIG"
        self.legacy_url = self.url + "/legacy/tenant@group/IncomingWebhook/1/2"

    def _respond(self, rec):
        if self.status:
            return self.status, "forced %d" % self.status, {"Content-Type": "text/plain", "Retry-After": "1"}
        try:
            doc = json.loads(rec.body.decode("utf-8"))
        except ValueError:
            return 400, "Bad payload: not JSON", {"Content-Type": "text/plain"}
        if rec.path.startswith("/workflow/"):
            return self._workflow(doc)
        if rec.path.startswith("/legacy/"):
            return self._legacy(doc)
        return 404, "no such webhook", {"Content-Type": "text/plain"}

    def _workflow(self, doc):
        problem = adaptive_problem(doc)
        if problem:
            return 400, problem, {"Content-Type": "text/plain"}
        self.cards.append(("adaptive", doc))
        return 202, b"", {}

    def _legacy(self, doc):
        problem = messagecard_problem(doc)
        if problem:
            return 400, problem, {"Content-Type": "text/plain"}
        if self.throttle:
            return 200, THROTTLED, {"Content-Type": "text/plain"}
        self.cards.append(("messagecard", doc))
        return 200, "1", {"Content-Type": "text/plain"}


def adaptive_problem(doc):
    """Why ``doc`` is not a Workflows message with Adaptive Cards, or None."""
    if not isinstance(doc, dict) or doc.get("type") != "message":
        return "type must be message"
    attachments = doc.get("attachments")
    if not isinstance(attachments, list) or not attachments:
        return "attachments must be a non-empty list"
    for att in attachments:
        if not isinstance(att, dict) or att.get("contentType") != ADAPTIVE:
            return "attachment contentType must be " + ADAPTIVE
        problem = _card_problem(att.get("content"))
        if problem:
            return problem
    return None


def _card_problem(card):
    if not isinstance(card, dict) or card.get("type") != "AdaptiveCard":
        return "content.type must be AdaptiveCard"
    if not isinstance(card.get("version"), str) or not isinstance(card.get("body"), list):
        return "AdaptiveCard needs a version string and a body list"
    for element in card["body"]:
        kind = element.get("type") if isinstance(element, dict) else None
        if kind == "TextBlock" and not isinstance(element.get("text"), str):
            return "TextBlock needs text"
        if kind == "FactSet" and not all(isinstance(f, dict) and isinstance(f.get("title"), str)
                                         and isinstance(f.get("value"), str) for f in element.get("facts", [])):
            return "FactSet facts need title and value strings"
        if kind not in ("TextBlock", "FactSet", "Image", "ColumnSet", "Container"):
            return "unknown element type %r" % kind
    return None


def messagecard_problem(doc):
    """Why ``doc`` is not a MessageCard the legacy connector accepts, or None."""
    if not isinstance(doc, dict):
        return "card must be a JSON object"
    if not (doc.get("summary") or doc.get("text")):
        return "Summary or Text is required."
    if "@type" in doc and doc["@type"] != "MessageCard":
        return "@type must be MessageCard"
    for sec in doc.get("sections", []):
        if not all(isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("value"), str)
                   for f in sec.get("facts", [])):
            return "section facts need name and value strings"
    return None
