"""A loopback iconik for tests: the API calls hookd makes, and iconik's side of a webhook delivery.

Strategy: follows reference/upstreams.md §1.5 to the letter. A real ``ThreadingHTTPServer`` on 127.0.0.1:0
serves, under ``/API/``, ``GET /assets/v1/assets/{id}/``, ``GET /files/v1/assets/{id}/proxies/`` (and
``/{proxy_id}/``) and ``POST /transcode/v1/analyze/assets/{id}/`` with its ``/profiles/...`` variants. Every
call needs both ``App-ID`` and ``Auth-Token`` (else 401 ``{"errors": [...]}``); an unknown asset is 404; the
old blog path ``/transcode/v1/videointel/...`` is 404 so a regression to it shows. A successful analyze is
201 with a small job body, is recorded (path and JSON body) and flips the asset's ``analyze_status`` to
``REQUESTED``. ``fail_analyze(503, 503)`` scripts the next answers; ``"drop"`` records the request and
closes the connection without answering (a reply lost on the way). The webhook definitions API (§1.2,
§1.3) is ``GET/POST /notifications/v1/webhooks/`` (a paginated list, ``per_page`` at most 100, with
``next_url``; POST 201 with the stored definition, 400 without ``event_type``, ``url`` or a valid
``status``) and ``GET/PUT/DELETE /notifications/v1/webhooks/{id}/`` (PUT 200, DELETE 204, unknown 404);
``set_webhook_status(id, "FAILING")`` plays iconik giving up on a failing target and ``drop_webhook(id)``
someone deleting it. ``envelope()`` builds the JSON iconik POSTs (§1.4) and ``deliver()`` sends it with
the webhook definition's custom headers.
"""

import datetime
import http.server
import json
import re
import threading
import urllib.parse
import uuid

from tests import support

ANALYZE_RE = re.compile(
    r"^/API/transcode/v1/analyze/assets/([^/]+)/(?:profiles/default/(?:([^/]+)/)?|profiles/([^/]+)/)?$")
ASSET_RE = re.compile(r"^/API/assets/v1/assets/([^/]+)/$")
PROXIES_RE = re.compile(r"^/API/files/v1/assets/([^/]+)/proxies/(?:([^/]+)/)?$")
WEBHOOKS_RE = re.compile(r"^/API/notifications/v1/webhooks/(?:([^/]+)/)?$")
WEBHOOK_STATUSES = ("ENABLED", "DISABLED", "FAILING", "DELETED")
WEBHOOK_FIELDS = ("name", "description", "event_type", "realm", "operation", "object_id", "query", "headers",
                  "url", "status")
SYSTEM_DOMAIN = "57016980-6e13-11e8-ab5a-0a580a3c0f5c"
USER_ID = "256ebe90-c0c8-11ec-9fcd-0648baddf8b3"


class FakeIconik:
    """iconik's API on loopback. ``assets`` {id: AssetSchema dict}, ``proxies`` {asset id: [ProxySchema]},
    ``analyze_calls`` (the analyze requests iconik took, as support.Recorded, in order; a "drop" counts,
    a scripted or auth failure does not), ``seen`` (every request)."""

    def __init__(self, app_id="app-id-1", auth_token="auth-token-1"):
        self.app_id, self.auth_token = app_id, auth_token
        self.assets, self.proxies = {}, {}
        self.analyze_calls, self.seen = [], []
        self.webhooks = {}  # id -> WebhookSchema dict, in creation order
        self._script = []
        self._lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    # -- test set-up -------------------------------------------------------------------------------

    def add_asset(self, title="clip.mov"):
        asset = {"id": str(uuid.uuid4()), "title": title, "type": "ASSET", "status": "ACTIVE",
                 "analyze_status": "N/A", "archive_status": "NOT_ARCHIVED",
                 "date_created": "2026-11-22T06:00:00.000000+00:00", "versions": []}
        with self._lock:
            self.assets[asset["id"]] = asset
            self.proxies[asset["id"]] = []
        return asset

    def add_proxy(self, asset_id, status="CLOSED"):
        proxy = {"id": str(uuid.uuid4()), "asset_id": asset_id, "name": "proxy.mp4",
                 "filename": "proxy.mp4", "format": "MP4", "codec": "h264", "status": status,
                 "storage_id": str(uuid.uuid4()), "resolution": {"width": 640, "height": 360},
                 "date_created": "2026-11-22T06:00:01.000000+00:00"}
        with self._lock:
            self.proxies.setdefault(asset_id, []).append(proxy)
        return proxy

    def set_webhook_status(self, webhook_id, status):
        with self._lock:
            hook = self.webhooks[webhook_id]
            hook["status"] = status
            if status == "FAILING":
                hook["first_failed_at"] = hook["first_failed_at"] or now_iso()
                hook["last_error"] = "Connection refused"

    def drop_webhook(self, webhook_id):
        with self._lock:
            del self.webhooks[webhook_id]

    def fail_analyze(self, *outcomes):
        """The next analyze calls answer these statuses in turn (an int, or "drop"), then 201 again."""
        with self._lock:
            self._script.extend(outcomes)

    def analyze_paths(self, asset_id=None):
        with self._lock:
            return [r.path for r in self.analyze_calls if asset_id is None or asset_id in r.path]

    def count(self, path_prefix):
        with self._lock:
            return sum(1 for r in self.seen if r.path.startswith(path_prefix))

    # -- serving -----------------------------------------------------------------------------------

    def _handler_class(self):
        fake = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _any(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                rec = support.Recorded(self.command, self.path,
                                       {k.lower(): v for k, v in self.headers.items()}, body)
                with fake._lock:
                    fake.seen.append(rec)
                status, answer = fake._answer(rec)
                if status == "drop":
                    self.close_connection = True
                    return
                data = b"" if status == 204 else json.dumps(answer).encode("utf-8")
                self.send_response(status)
                if status != 204:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _any

        return H

    def _answer(self, rec):
        """(status, JSON answer) for one request, like iconik would."""
        path = rec.path.split("?", 1)[0]
        analyze, asset, proxies = ANALYZE_RE.match(path), ASSET_RE.match(path), PROXIES_RE.match(path)
        webhooks = WEBHOOKS_RE.match(path)
        if not (analyze or asset or proxies or webhooks):
            return 404, {"errors": ["Not found"]}  # includes the old /transcode/v1/videointel/ path
        if rec.headers.get("app-id") != self.app_id or rec.headers.get("auth-token") != self.auth_token:
            return 401, {"errors": ["Token is invalid"]}
        if webhooks:
            return self._webhooks(rec, webhooks.group(1))
        if analyze and rec.method == "POST":
            return self._analyze(rec, analyze.group(1))
        if asset and rec.method == "GET":
            return self._get_asset(asset.group(1))
        if proxies and rec.method == "GET":
            return self._get_proxies(proxies.group(1), proxies.group(2))
        return 405, {"errors": ["Method not allowed"]}

    def _analyze(self, rec, asset_id):
        if not is_analyze_body(rec.body):
            return 400, {"errors": ["Bad request"]}
        with self._lock:
            scripted = self._script.pop(0) if self._script else None
            if scripted is not None and scripted != "drop":
                return scripted, {"errors": ["Service unavailable"]}
            if asset_id not in self.assets:
                return 404, {"errors": ["Asset does not exist"]}
            self.analyze_calls.append(rec)
            self.assets[asset_id]["analyze_status"] = "REQUESTED"
        if scripted == "drop":
            return "drop", None
        return 201, {"id": str(uuid.uuid4()), "status": "STARTED", "object_id": asset_id,
                     "object_type": "assets", "type": "ANALYZE"}

    def _get_asset(self, asset_id):
        with self._lock:
            asset = self.assets.get(asset_id)
            return (200, dict(asset)) if asset else (404, {"errors": ["Asset does not exist"]})

    def _get_proxies(self, asset_id, proxy_id):
        with self._lock:
            items = self.proxies.get(asset_id)
            if items is None or asset_id not in self.assets:
                return 404, {"errors": ["Proxies for this asset doesn't exist"]}
            if proxy_id is None:
                return 200, {"objects": list(items), "page": 1, "pages": 1, "per_page": 10,
                             "total": len(items)}
            for proxy in items:
                if proxy["id"] == proxy_id:
                    return 200, dict(proxy)
            return 404, {"errors": ["Proxy for this asset doesn't exist"]}


    # -- webhook definitions -------------------------------------------------------------------------

    def _webhooks(self, rec, webhook_id):
        if webhook_id is None and rec.method == "GET":
            return self._list_webhooks(rec)
        if webhook_id is None and rec.method == "POST":
            return self._create_webhook(rec)
        if webhook_id is None:
            return 405, {"errors": ["Method not allowed"]}
        with self._lock:
            hook = self.webhooks.get(webhook_id)
            if hook is None:
                return 404, {"errors": ["Webhook does not exist"]}
            if rec.method == "GET":
                return 200, dict(hook)
            if rec.method == "DELETE":
                del self.webhooks[webhook_id]
                return 204, None
        if rec.method == "PUT":
            doc, problem = webhook_body(rec.body)
            if problem:
                return 400, {"errors": [problem]}
            with self._lock:
                hook.update({k: doc.get(k) for k in WEBHOOK_FIELDS}, date_modified=now_iso())
                return 200, dict(hook)
        return 405, {"errors": ["Method not allowed"]}

    def _create_webhook(self, rec):
        doc, problem = webhook_body(rec.body)
        if problem:
            return 400, {"errors": [problem]}
        hook = {k: doc.get(k) for k in WEBHOOK_FIELDS}
        hook.update(id=str(uuid.uuid4()), date_created=now_iso(), date_modified=now_iso(), deleted_at=None,
                    first_failed_at=None, last_error=None, last_payload=None)
        with self._lock:
            self.webhooks[hook["id"]] = hook
        return 201, dict(hook)

    def _list_webhooks(self, rec):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(rec.path).query)
        try:
            page = max(1, int((query.get("page") or ["1"])[0]))
            per_page = min(100, max(1, int((query.get("per_page") or ["10"])[0])))
        except ValueError:
            return 400, {"errors": ["Bad request"]}
        with self._lock:
            hooks = [dict(h) for h in self.webhooks.values()]
        pages = max(1, -(-len(hooks) // per_page))
        base = "/API/notifications/v1/webhooks/?per_page=%d&page=" % per_page
        return 200, {"objects": hooks[(page - 1) * per_page:page * per_page], "page": page, "pages": pages,
                     "per_page": per_page, "total": len(hooks), "first_url": base + "1",
                     "last_url": base + str(pages), "next_url": base + str(page + 1) if page < pages else None,
                     "prev_url": base + str(page - 1) if page > 1 else None}


def webhook_body(body):
    """(definition, None) for a valid WebhookCreateSchema body, else (None, problem)."""
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None, "Bad request"
    if not isinstance(doc, dict):
        return None, "Bad request"
    for key in ("event_type", "url", "status"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            return None, "%s: Missing data for required field." % key
    if doc["status"] not in WEBHOOK_STATUSES:
        return None, "status: Must be one of: %s." % ", ".join(WEBHOOK_STATUSES)
    headers = doc.get("headers")
    if headers is not None and not (isinstance(headers, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items())):
        return None, "headers: Not a valid mapping of strings."
    return doc, None


def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def is_analyze_body(body):
    """Empty, or a JSON object with only AnalyzeSchema's optional fields."""
    if not body:
        return True
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False
    return isinstance(value, dict) and set(value) <= {"force", "force_type", "service_name"}


# -- iconik's side of a webhook ----------------------------------------------------------------------

def envelope(event_type, realm, operation, object_id, data, request_id=None):
    """The JSON iconik POSTs to a webhook URL (upstreams.md §1.4)."""
    return {"system_domain_id": SYSTEM_DOMAIN, "event_type": event_type, "object_id": object_id,
            "user_id": USER_ID, "realm": realm, "operation": operation, "data": data,
            "request_id": request_id or uuid.uuid4().hex}


def asset_created(asset):
    return envelope("assets", "entity", "create", asset["id"], dict(asset))


def proxy_event(proxy, operation="update", object_id=None):
    """assets/proxies/<operation>; ``object_id`` defaults to the proxy id (which one iconik sends is not
    confirmed, so hookd must read data.asset_id)."""
    return envelope("assets", "proxies", operation, object_id or proxy["id"], dict(proxy))


def deliver(url, event, headers=None, chunked=False):
    """POST one event as iconik does: JSON body plus the definition's custom headers."""
    body = event if isinstance(event, bytes) else json.dumps(event).encode("utf-8")
    hdrs = dict({"Content-Type": "application/json"}, **(headers or {}))
    return support.post(url, body, hdrs, chunked=chunked)
