"""What the benchmark measures: the workloads, and the targets with the command line that starts each.

Strategy: a ``Workload`` names its Lua script, signing scheme, route and signature header; a ``Target``
knows which workloads it takes and how to start on a port inside its own scratch directory. Peers get
the same bodies as hookd; adnanh/webhook cannot check Preservica's prefixed HMAC, so it gets the same
bodies signed its way (``payload-hmac-sha256`` over the body, header ``X-Hub-Signature-256``), which is
the closest equivalent work. Peer Python targets run from the benchmark's venv (``BENCH_VENV``), never
from the product's interpreter environment.
"""

import json
import os
import sys

from . import pool

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(BENCH)
SERVERS = os.path.join(BENCH, "servers")
HOOKD = os.path.join(ROOT, "hookd.py")


class Workload:
    """``events``: events per request (a Preservica delivery carries several)."""

    def __init__(self, name, lua, scheme, route, header, title, events=1):
        self.name, self.lua, self.scheme = name, lua, scheme
        self.route, self.header, self.title, self.events = route, header, title, events


WORKLOADS = [
    Workload("preservica-cl", "preservica_cl.lua", "preservica", "/preservica", "Preservica-Signature",
             "Preservica delivery of %d events, Content-Length body" % pool.EVENTS_PER_DELIVERY,
             pool.EVENTS_PER_DELIVERY),
    Workload("preservica-chunked", "preservica_chunked.lua", "preservica", "/preservica",
             "Preservica-Signature", "Preservica delivery of %d events, chunked body" % pool.EVENTS_PER_DELIVERY,
             pool.EVENTS_PER_DELIVERY),
    Workload("standard", "stdwebhooks.lua", "standard", "/hooks/bench", "",
             "Standard Webhooks event to /hooks/bench, Content-Length body"),
    Workload("standard-chunked", "stdwebhooks_chunked.lua", "standard", "/hooks/bench", "",
             "Standard Webhooks event to /hooks/bench, chunked body"),
]


class Target:
    """name, role (ceiling | reference | hookd | peer | peer-reference), workloads, start argv."""

    def __init__(self, name, role, workloads, argv, title, adnanh=False, stores=True, closes=False,
                 per_event=False):
        self.name, self.role, self.workloads = name, role, workloads
        self._argv, self.title, self.adnanh = argv, title, adnanh
        self.stores = stores  # keeps one row per accepted request in an events table (checked per run)
        self.per_event = per_event  # one row per event of a delivery instead of one per request
        self.closes = closes  # answers HTTP/1.0 without Content-Length: the connection close ends it

    def store_path(self, workdir):
        """The sqlite file whose events table must grow by one row per 2xx (None: nothing stored)."""
        if not self.stores:
            return None
        if self.role == "hookd":
            return None  # found under workdir/var by hookdctl
        return os.path.join(workdir, "events.db")

    def argv(self, port, workdir):
        return self._argv(port, workdir)

    def request_shape(self, workload):
        """(scheme, route, header) for this target on ``workload``."""
        if self.adnanh:
            return "plain", "/hooks/bench", "X-Hub-Signature-256"
        return workload.scheme, workload.route, workload.header


def venv_python():
    venv = os.environ.get("BENCH_VENV", os.path.join(BENCH, ".venv"))
    return os.path.join(venv, "bin", "python")


def hookd_config(workdir, extra_hook="", extra_hookd=""):
    """Write hookd's bench configuration into ``workdir``; returns its path."""
    path = os.path.join(workdir, "credentials.properties")
    with open(path, "w") as f:
        f.write("[hookd]\nstate_dir = %s\nadmin.listen = unix:%s\nworkers = 4\nmax_connections = 256\n"
                "max_connections_per_client = 256\nshutdown_grace = 3\n%s\n"
                "[preservica]\nsecret.key = %s\n\n"
                "[hook:bench]\nverify = standard-webhooks\nsecret = %s\n%s"
                % (os.path.join(workdir, "var"), os.path.join(workdir, "admin.sock"), extra_hookd,
                   pool.PRESERVICA_SECRET.decode(), pool.WHSEC, extra_hook))
    os.chmod(path, 0o600)
    return path


def hookd_argv(port, config):
    """hookd serving on ``port``, started as systemd/hookd.service starts it (MALLOC_ARENA_MAX=2: glibc
    would give each of up to 64 connection threads its own malloc arena)."""
    return ["env", "MALLOC_ARENA_MAX=2", sys.executable, HOOKD, "127.0.0.1:%d" % port, "--config", config]


def _hookd(port, workdir):
    return hookd_argv(port, hookd_config(workdir))


def _adnanh_hooks(workdir, command):
    path = os.path.join(workdir, "hooks.json")
    rule = {"match": {"type": "payload-hmac-sha256", "secret": pool.PRESERVICA_SECRET.decode(),
                      "parameter": {"source": "header", "name": "X-Hub-Signature-256"}}}
    with open(path, "w") as f:
        json.dump([{"id": "bench", "execute-command": command, "trigger-rule": rule,
                    "trigger-rule-mismatch-http-response-code": 401}], f)
    return path


def _adnanh(command):
    def argv(port, workdir):
        return ["webhook", "-hooks", _adnanh_hooks(workdir, command), "-ip", "127.0.0.1",
                "-port", str(port)]
    return argv


def _gunicorn(port, workdir):
    gunicorn = os.path.join(os.path.dirname(venv_python()), "gunicorn")
    db = os.path.join(workdir, "events.db")
    return [gunicorn, "-b", "127.0.0.1:%d" % port, "-w", "3", "-k", "gthread", "--threads", "4",
            "--log-level", "warning", "--chdir", SERVERS, "flask_app:make_app(%r)" % db]


def _script(interp, name, durable=True):
    def argv(port, workdir):
        args = [interp(), os.path.join(SERVERS, name), str(port)]
        return args + [os.path.join(workdir, "events.db")] if durable else args
    return argv


ALL_WORKLOADS = [w.name for w in WORKLOADS]
PEER_WORKLOADS = ["preservica-cl"]

TARGETS = [
    Target("ceiling", "ceiling", ALL_WORKLOADS, _script(lambda: sys.executable, "ceiling.py", False),
           "bare ThreadingHTTPServer, reads body, 204", stores=False),
    Target("naive-durable", "reference", ALL_WORKLOADS,
           _script(lambda: sys.executable, "naive_durable.py"),
           "ceiling + HMAC + one sqlite commit per request (synchronous=FULL)"),
    Target("hookd", "hookd", ALL_WORKLOADS, _hookd, "hookd.py, durable, workers running", per_event=True),
    Target("pypreservica", "peer", ["preservica-chunked"], _script(venv_python, "pypreservica_app.py"),
           "pyPreservica WebHookHandler on HTTPServer (as documented), do_WORK = sqlite commit",
           closes=True),
    Target("flask-dev", "peer", PEER_WORKLOADS, _script(venv_python, "flask_app.py"),
           "Flask dev server (threaded), HMAC + sqlite commit per request"),
    Target("gunicorn", "peer", PEER_WORKLOADS, _gunicorn,
           "same Flask app under gunicorn (3 gthread workers x 4 threads)"),
    Target("webhook-cmd", "peer", PEER_WORKLOADS, _adnanh("/bin/true"),
           "adnanh/webhook, payload-hmac-sha256 rule, runs /bin/true", adnanh=True, stores=False),
    Target("webhook-nocmd", "peer-reference", PEER_WORKLOADS, _adnanh(""),
           "adnanh/webhook, payload-hmac-sha256 rule, no command (compiled-language reference)",
           adnanh=True, stores=False),
]
