"""pyPreservica peer: its ``WebHookHandler`` served the way its documentation shows, storing each event.

Usage: ``python pypreservica_app.py PORT DBFILE`` (from the venv that has pyPreservica). As documented:
a single-threaded ``http.server.HTTPServer`` with ``secret_key`` set on it, and a ``WebHookHandler``
subclass whose ``do_WORK`` does the job; here ``do_WORK`` inserts and commits the event like
``naive_durable.py``. The handler only accepts chunked bodies, answers with HTTP/1.0 and no
Content-Length (so the connection closes after each request, once ``do_WORK`` has returned), and logs
two lines per request to stderr; all of that is the peer's own behaviour and is left as it is.
"""

import http.server
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import PRESERVICA_SECRET, Store  # noqa: E402

from pyPreservica.webHooksAPI import WebHookHandler  # noqa: E402

STORE = None


class Handler(WebHookHandler):
    def do_WORK(self, event):
        STORE.insert("/preservica", json.dumps(event).encode())


def main():
    global STORE
    STORE = Store(sys.argv[2])
    server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    server.secret_key = PRESERVICA_SECRET.decode()
    server.serve_forever()


if __name__ == "__main__":
    main()
