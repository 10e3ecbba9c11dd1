"""The command line: run the daemon, or one subcommand on the same configuration and state directory.

Strategy: ``main(argv)`` looks at the first word. A known subcommand (``check-config``, ``events``,
``event``, ``retry``, ``replay``, ``prune``, or one that an integration adds through ``COMMANDS``) runs on
an ``App`` that opens the store but starts no server and no workers; ``worker`` runs jobs leased from
another hookd (``remote.py``); anything else is the daemon's
``[HOST:PORT]``. Exit codes: 0 success, 1 a problem the message explains, 2 bad usage. What a sender or
a job wrote (a body, a last error, a note) is printed with its control characters escaped
(``logs.escaped``), so it can never drive the operator's terminal; ``--json`` escapes them too.
"""

import argparse
import json
import os
import sys

from . import config as config_mod
from . import logs, subscriptions
from .api import Fail, Retry
from .app import App
from .admin import public_event
from .store import STATUSES, StoreError, list_events, row_dict

USAGE = """usage: hookd.py [HOST:PORT] [--config FILE]
       hookd.py check-config [--config FILE]
       hookd.py events [--status S] [--route R] [--json] [--limit N] [--config FILE]
       hookd.py event ID [--json] [--config FILE]
       hookd.py retry ID | --dead [--config FILE]
       hookd.py replay ID [--config FILE]
       hookd.py prune [--days N] [--config FILE]
       hookd.py worker --from URL [--token T] [--routes R,...] [--lease-seconds S] [--name NAME] [--config FILE]
       hookd.py subscribe preservica TRIGGER | subscribe iconik [--config FILE]
       hookd.py subscriptions [--json] [--config FILE]
       hookd.py unsubscribe ROUTE ID [--config FILE]
       hookd.py test-recording | ixon-configure | zencoder-submit ...   (integration commands)"""

BUILTIN = ("check-config", "events", "event", "retry", "replay", "prune", "subscribe", "subscriptions",
           "unsubscribe")


class Usage(Exception):
    """Bad command-line usage: exit 2."""


def _split_config(argv):
    """Remove ``--config FILE`` from argv wherever it stands; returns (config_path, rest)."""
    rest, path, i = [], None, 0
    while i < len(argv):
        if argv[i] == "--config":
            if i + 1 >= len(argv):
                raise Usage("--config needs a file")
            path, i = argv[i + 1], i + 2
        elif argv[i].startswith("--config="):
            path, i = argv[i][9:], i + 1
        else:
            rest.append(argv[i])
            i += 1
    return config_mod.find_path(path), rest


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    os.umask(0o077)  # files and directories hookd (and its children) create are private, whatever the umask
    try:
        path, rest = _split_config(argv)
        if rest and rest[0] in ("-h", "--help", "help"):
            print(USAGE)
            return 0
        if rest and rest[0] in BUILTIN:
            return builtin(rest[0], rest[1:], path)
        if rest and rest[0] == "worker":
            from .remote import main as worker_main
            return worker_main(path, rest[1:])
        app = App(path)
        if rest and rest[0] in _integration_commands(app):
            return integration_command(app, rest[0], rest[1:])
        return daemon(app, rest)
    except Usage as e:
        print("hookd: %s\n%s" % (e, USAGE), file=sys.stderr)
        return 2
    except StoreError as e:  # the database cannot be opened (one written by a newer hookd)
        print("hookd: %s" % e, file=sys.stderr)
        return 1


def _integration_commands(app):
    out = {}
    for cls in app.classes.values():
        out.update(cls.COMMANDS)
    return out


def daemon(app, rest):
    if len(rest) > 1:
        raise Usage("unexpected arguments: %s" % " ".join(rest[1:]))
    host, port = parse_address(rest[0] if rest else "127.0.0.1:8000")
    if app.problems:
        for p in app.problems:
            print("hookd: %s" % p, file=sys.stderr)
        return 1
    try:
        return app.serve(host, port)
    except OSError as e:
        app.log.error("cannot listen on %s:%d: %s", host, port, e.strerror or e)
        return 1


def parse_address(text):
    try:
        return config_mod.parse_hostport(text)
    except config_mod.ConfigError:
        raise Usage("expected HOST:PORT, got %r" % text)


def _open(path):
    app = App(path)
    if app.problems:
        for p in app.problems:
            print("hookd: %s" % p, file=sys.stderr)
        raise SystemExit(1)
    app.open_store()
    return app


def integration_command(app, name, args):
    """Run an integration's own subcommand with its configured Handler (the section must exist)."""
    if app.problems:
        for p in app.problems:
            print("hookd: %s" % p, file=sys.stderr)
        return 1
    cls = next(c for c in app.classes.values() if name in c.COMMANDS)
    handler = next((i for i in app.integrations if isinstance(i, cls)), None)
    if handler is None:
        print("hookd: %s needs a [%s] section in the configuration" % (name, cls.SECTION.rstrip(":")),
              file=sys.stderr)
        return 1
    app.open_store()
    try:
        return cls.COMMANDS[name](handler, args) or 0
    finally:
        app.store.close()


def builtin(name, args, path):
    if name == "check-config":
        return check_config(args, path)
    parser = _parsers()[name]
    try:
        ns = parser.parse_args(args)
    except SystemExit as e:
        return 2 if e.code else 0
    app = _open(path)
    try:
        return globals()["cmd_" + name.replace("-", "_")](app, ns)
    finally:
        app.store.close()


def _parsers():
    p = {}
    ev = p["events"] = _Parser(prog="hookd.py events")
    ev.add_argument("--status", choices=STATUSES)
    ev.add_argument("--route")
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--limit", type=int, default=50)
    one = p["event"] = _Parser(prog="hookd.py event")
    one.add_argument("id", type=int)
    one.add_argument("--json", action="store_true")
    rt = p["retry"] = _Parser(prog="hookd.py retry")
    rt.add_argument("id", type=int, nargs="?")
    rt.add_argument("--dead", action="store_true")
    rp = p["replay"] = _Parser(prog="hookd.py replay")
    rp.add_argument("id", type=int)
    pr = p["prune"] = _Parser(prog="hookd.py prune")
    pr.add_argument("--days", type=float)
    su = p["subscribe"] = _Parser(prog="hookd.py subscribe")
    su.add_argument("route", metavar="preservica|iconik")
    su.add_argument("trigger", nargs="?")
    ls = p["subscriptions"] = _Parser(prog="hookd.py subscriptions")
    ls.add_argument("--json", action="store_true")
    un = p["unsubscribe"] = _Parser(prog="hookd.py unsubscribe")
    un.add_argument("route")
    un.add_argument("id")
    return p


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print("hookd: %s" % message, file=sys.stderr)
        raise SystemExit(2)


def check_config(args, path):
    if args:
        print("hookd: check-config takes no arguments but --config", file=sys.stderr)
        return 2
    if not os.path.exists(path):
        print("%s: not found (the daemon would start with every integration disabled)" % path)
        return 1
    app = App(path)
    for w in app.warnings:
        print("warning: %s" % w)
    for p in app.problems:
        print(p)
    if app.problems:
        return 1
    print("%s: OK, %d integrations: %s" % (path, len(app.integrations),
                                           ", ".join(i.name for i in app.integrations) or "none"))
    return 0


def cmd_events(app, ns):
    rows = app.store.read(lambda c: list_events(c, ns.status, ns.route, ns.limit))
    events = [public_event(r) for r in rows]
    if ns.json:
        print(json.dumps(events, indent=1))
        return 0
    print("%-8s %-20s %-9s %-4s %-24s %s" % ("ID", "ROUTE", "STATUS", "TRY", "RECEIVED", "LAST ERROR"))
    for e in events:
        print("%-8s %-20s %-9s %-4s %-24s %s" % (e["id"], e["route"][:20], e["status"], e["attempts"],
                                                 e["received_at"], logs.escaped((e["last_error"] or "")[:80])))
    return 0


def cmd_event(app, ns):
    row = app.store.read(lambda c: row_dict(c, ns.id, with_body=True))
    if row is None:
        print("hookd: no event %d" % ns.id, file=sys.stderr)
        return 1
    event = public_event(row, full=True)
    if ns.json:
        print(json.dumps(event, indent=1))
    else:
        for key in ("id", "route", "status", "attempts", "received_at", "updated_at", "next_attempt_at",
                    "last_error", "note", "duplicate_of", "content_type"):
            print("%-16s %s" % (key + ":", "" if event.get(key) is None else logs.escaped(str(event[key]))))
        print("payload:")
        print(json.dumps(event["payload"], indent=1) if event["payload"] is not None
              else "\n".join(logs.escaped(line) for line in event.get("body", "(binary body)").split("\n")))
    return 0


def cmd_retry(app, ns):
    if (ns.id is None) == (not ns.dead):
        print("hookd: retry takes an event ID or --dead", file=sys.stderr)
        return 2
    ids = app.store.retry(ns.id, all_dead=ns.dead)
    if not ids:
        print("hookd: %s" % ("no dead events" if ns.dead else "event %d is not dead or retrying" % ns.id),
              file=sys.stderr)
        return 1
    print("queued again: %s" % " ".join(str(i) for i in ids))
    return 0


def cmd_replay(app, ns):
    new_id = app.store.replay(ns.id)
    if new_id is None:
        print("hookd: no event %d" % ns.id, file=sys.stderr)
        return 1
    print(new_id)
    return 0


def cmd_prune(app, ns):
    days = ns.days if ns.days is not None else app.settings.float("retention.days")
    print("pruned %d events" % app.store.prune(days))
    for line in app.prune_files():
        print(line)
    return 0


UPSTREAM_ERRORS = (subscriptions.UpstreamError, Retry, Fail)


def cmd_subscribe(app, ns):
    if not app.settings.get("public_url"):
        print("hookd: [hookd] public_url is not set (the base URL senders reach this daemon at)", file=sys.stderr)
        return 1
    try:
        upstream = subscriptions.upstream_for(app, ns.route)
    except subscriptions.UpstreamError as e:
        print("hookd: subscribe %s: %s" % (ns.route, e), file=sys.stderr)
        return 1
    if upstream.TRIGGERS and ns.trigger not in upstream.TRIGGERS:
        print("hookd: subscribe %s needs a trigger: %s" % (ns.route, " | ".join(upstream.TRIGGERS)), file=sys.stderr)
        return 2
    if not upstream.TRIGGERS and ns.trigger is not None:
        print("hookd: subscribe %s takes no trigger" % ns.route, file=sys.stderr)
        return 2
    try:
        created, skipped = upstream.subscribe(ns.trigger)
    except UPSTREAM_ERRORS as e:
        print("hookd: subscribe %s: %s" % (ns.route, e), file=sys.stderr)
        return 1
    app.store.write(lambda c: subscriptions.observe(c, app.settings, upstream.route, created + skipped,
                                                    complete=False))
    if upstream.TRIGGERS:
        print(created[0].id)
        return 0
    for sub in created:
        print("created %s %s" % (sub.id, sub.filter))
    for sub in skipped:
        print("exists  %s %s (%s)" % (sub.id, sub.filter, sub.status))
    return 0


def cmd_subscriptions(app, ns):
    upstreams = subscriptions.upstreams(app)
    if not upstreams:
        print("hookd: no upstream with a subscription API is configured ([preservica] with server, username"
              " and password; [iconik])", file=sys.stderr)
        return 1
    if not app.settings.get("public_url"):
        print("hookd: [hookd] public_url is not set: only subscriptions hookd already knows are shown",
              file=sys.stderr)
    failed = []
    for route, upstream in upstreams.items():
        try:
            subscriptions.check(app, route, upstream)
        except UPSTREAM_ERRORS as e:
            failed.append("hookd: listing %s failed: %s" % (route, e))
    subs = [s for s in app.store.read(subscriptions.known).values() if s.route in upstreams]
    if ns.json:
        print(json.dumps([dict(s.as_dict(), up=s.up) for s in subs], indent=1))
    else:
        print("%-11s %-36s %-9s %-4s %-28s %s" % ("ROUTE", "ID", "STATUS", "UP", "FILTER", "URL"))
        for s in subs:
            print("%-11s %-36s %-9s %-4s %-28s %s" % (s.route, s.id, s.status, "yes" if s.up else "NO",
                                                      s.filter, s.url or ""))
    for line in failed:
        print(line, file=sys.stderr)
    return 1 if failed else 0


def cmd_unsubscribe(app, ns):
    try:
        deleted = subscriptions.upstream_for(app, ns.route).delete(ns.id)
    except UPSTREAM_ERRORS as e:
        print("hookd: unsubscribe %s %s: %s" % (ns.route, ns.id, e), file=sys.stderr)
        return 1
    app.store.write(lambda c: subscriptions.forget(c, ns.route, ns.id))
    if not deleted:
        print("hookd: %s has no subscription %s (hookd forgot it too)" % (ns.route, ns.id), file=sys.stderr)
        return 1
    print("deleted %s %s" % (ns.route, ns.id))
    return 0
