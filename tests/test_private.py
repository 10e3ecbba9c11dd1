"""What hookd keeps stays private (SPEC §7, issue 16): files and directories it creates are 0600/0700
whatever the umask, and stored headers never hold a credential.

The permissions test follows the README quick start (its configuration is read from README.md) with the
umask at 022, the usual interactive default, and stats the state directory, the database and its
``-wal``/``-shm`` while the daemon runs, and the file the quick start's command writes.
"""

import json
import os
import re
import shutil
import stat
import tempfile
import unittest

from hookd_core import redact
from hookd_core.api import Headers
from hookd_core.redact import StoredHeaders, stored_headers
from tests.support import ROOT, Daemon, hmac_hex


def quick_start_config():
    """The configuration file the README quick start writes."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    m = re.search(r"## Quick start.*?cat > credentials\.properties <<'EOF'\n(.*?)\nEOF\n", readme, re.S)
    assert m, "README has no quick start configuration"
    return m.group(1) + "\n"


def mode(path):
    return oct(stat.S_IMODE(os.stat(path).st_mode))


class PermissionsTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="hookd-private-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        old = os.umask(0o022)
        self.addCleanup(os.umask, old)

    def test_quick_start_with_umask_022_creates_only_private_files(self):
        d = Daemon(quick_start_config(), tmpdir=self.tmp)
        self.addCleanup(d.stop)
        d.start()
        body = b'{"hello": "world"}'
        status, _, reply = d.post("/hooks/demo", body, {"Content-Type": "application/json",
                                                         "X-Signature": "sha256=" + hmac_hex("change-me", body)})
        self.assertEqual(status, 202, reply)
        d.wait_status(json.loads(reply)["id"], "done")
        db = os.path.join(d.state_dir, "hookd.sqlite3")
        found = {p: mode(p) for p in (d.state_dir, db, db + "-wal", db + "-shm",
                                      os.path.join(self.tmp, "received.jsonl"))}
        self.assertEqual(found, {d.state_dir: "0o700", db: "0o600", db + "-wal": "0o600", db + "-shm": "0o600",
                                 os.path.join(self.tmp, "received.jsonl"): "0o600"})


class StoredHeadersTest(unittest.TestCase):
    HEADERS = {"Content-Type": "application/json", "X-Request-Id": "r-1", "X-Auth": "Basic dXNlcjpzM2NyZXQ=",
               "X-Api-Auth": "tok-abc", "X-Forwarded-Creds": "Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig",
               "X-Note": "digest of the day", "X-Upstream": "Token abc123def456"}

    def test_configured_credential_headers_and_auth_values_are_not_stored(self):
        kept = stored_headers(self.HEADERS, secrets=[], credential_headers={"x-api-auth"})
        self.assertEqual(kept, {"content-type": "application/json", "x-request-id": "r-1",
                                "x-note": "digest of the day"})

    def test_stored_json_is_the_kept_headers_json_again_and_again(self):
        cases = [list(self.HEADERS.items()),
                 [("Host", "h"), ("X-Note", "caf\xe9 \"q\" \\ \x7f"), ("x-note", "second"), ("X-Id", "1")],
                 [("X-Api-Auth", "a"), ("X-Id", "my s3cret value"), ("Content-Type", "text/plain")], []]
        cases += [[("Host", "h"), ("X-Id", "id-%d" % n)] for n in range(StoredHeaders.MAX_PAIRS * 2)]
        # a name remembered with a kept value, then with a credential or a secret as its value
        cases += [[("X-Id", "Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig")], [("X-Id", "my-s3cret")], [("X-Id", "id-0")]]
        stored = StoredHeaders(["s3cret"], {"x-api-auth"})
        for _ in range(2):  # the second round finds what the first one remembered
            for items in cases:
                with self.subTest(items=items[:3]):
                    self.assertEqual(stored.json(Headers(items)),
                                     json.dumps(stored_headers(Headers(items), ["s3cret"], {"x-api-auth"})))

    def test_what_is_remembered_stays_small_whatever_the_headers(self):
        # Names and values of up to max_header_bytes, all different: each one is still stored
        # right, but the caches behind StoredHeaders must not keep them (they once held ~28 MB).
        stored = StoredHeaders([], set())
        for n in range(300):
            items = [("X-Big", "\xff" * 16000 + str(n)), ("X-%d-%s" % (n, "n" * 8000), "v")]
            self.assertEqual(stored.json(Headers(items)), json.dumps(stored_headers(Headers(items), [], ())))
        remembered = sum(len(name) + len(value) + len(member) + len(lead)
                         for name, (value, member, lead) in stored._pairs.items())
        remembered += sum(len(name) + len(low) for name, low in redact._NAMES.items())
        self.assertLess(remembered, 1 << 20)

    def test_end_to_end_the_token_header_of_a_route_is_not_stored(self):
        tmp = tempfile.mkdtemp(prefix="hookd-private-")
        self.addCleanup(shutil.rmtree, tmp, True)
        d = Daemon("[hook:t]\nverify = token\ntoken.header = X-Auth\nsecret = s3cret\n", tmpdir=tmp)
        self.addCleanup(d.stop)
        d.start()
        status, _, reply = d.post("/hooks/t", b"{}", {"Content-Type": "application/json", "X-Request-Id": "r-1",
                                                      "X-Auth": "Basic dXNlcjpzM2NyZXQ=",
                                                      "X-Other": "Bearer abc.def.ghi"})
        self.assertEqual(status, 202, reply)
        headers = d.event(json.loads(reply)["id"])["headers"]
        self.assertEqual(headers.get("x-request-id"), "r-1")
        self.assertNotIn("x-auth", headers)
        self.assertNotIn("x-other", headers)


if __name__ == "__main__":
    unittest.main()
