"""Ceiling target: the barest stdlib HTTP/1.1 server that reads each request body and answers 204.

Usage: ``python3 ceiling.py PORT``. A ``ThreadingHTTPServer`` (one thread per connection, keep-alive,
listen backlog 128 so 64 connections connect at once) whose handler reads the whole body, Content-Length
or chunked, and answers ``204`` with ``Content-Length: 0``. It verifies and stores nothing: every other
target's requests per second are reported as a ratio of this one's, measured in the same run. The
benchmark also uses it as the loopback sink for hookd's ``forward`` action.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import QuietHandler, Server, read_body  # noqa: E402


class Handler(QuietHandler):
    def do_POST(self):
        read_body(self)
        self.answer(204)


def main():
    Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()


if __name__ == "__main__":
    main()
