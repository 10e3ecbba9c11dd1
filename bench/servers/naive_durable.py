"""Naive-durable target: the ceiling server plus a signature check and one sqlite commit per request.

Usage: ``python3 naive_durable.py PORT DBFILE``. Same ``ThreadingHTTPServer`` as ``ceiling.py``; each
request's body is read, its signature checked (Preservica on ``/preservica``, Standard Webhooks on
``/hooks/NAME``; 401 when wrong), then inserted and committed on its own with WAL + synchronous=FULL
before the 202. This is what "durable before the 2xx" costs when done the obvious way; hookd's group
commit is meant to beat it by committing many requests' inserts with one fsync.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import QuietHandler, Server, Store, read_body, verify  # noqa: E402

STORE = None


class Handler(QuietHandler):
    def do_POST(self):
        body = read_body(self)
        if body is None or not verify(self.path, self.headers, body):
            return self.answer(401)
        STORE.insert(self.path, body)
        self.answer(202)


def main():
    global STORE
    STORE = Store(sys.argv[2])
    Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()


if __name__ == "__main__":
    main()
