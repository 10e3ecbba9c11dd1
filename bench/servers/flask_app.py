"""Flask peer: the naive-durable work (signature check, one sqlite commit per request) as a Flask app.

Usage: ``python flask_app.py PORT DBFILE`` runs Flask's own development server (threaded, as
``flask run`` does); ``gunicorn -b 127.0.0.1:PORT 'flask_app:make_app("DBFILE")'`` runs the same app
under gunicorn. The view reads ``request.get_data()`` (Werkzeug de-chunks a chunked body), verifies the
signature with the same code as ``naive_durable.py``, inserts and commits, and answers 202 — what a
typical Flask webhook receiver in the wild does.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Store, verify  # noqa: E402

from flask import Flask, request  # noqa: E402


def make_app(db_path):
    """A Flask app answering POST on any path, backed by ``Store(db_path)``."""
    app = Flask("bench")
    store = Store(db_path)

    @app.route("/<path:route>", methods=["POST"])
    def receive(route):
        body = request.get_data()
        if not verify("/" + route, request.headers, body):
            return "", 401
        store.insert("/" + route, body)
        return "", 202

    return app


def main():
    import logging
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    make_app(sys.argv[2]).run(host="127.0.0.1", port=int(sys.argv[1]), threaded=True)


if __name__ == "__main__":
    main()
