"""Optional TLS: with tls.cert and tls.key set, hookd serves HTTPS (and still verifies, stores, answers).
The certificate is made for the test with the openssl command; skipped with the reason where it is absent."""

import http.client
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import unittest

from tests.support import Daemon

TOKEN = "tls-token-6d1e"


@unittest.skipIf(shutil.which("openssl") is None, "no openssl command to make a test certificate")
class TlsTest(unittest.TestCase):
    def test_https_intake(self):
        tmp = tempfile.mkdtemp(prefix="hookd-tls-")
        cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                       check=True, capture_output=True, timeout=60)
        d = Daemon("[hookd]\ntls.cert = %s\ntls.key = %s\n[hook:t]\nverify = token\nsecret = %s\n"
                   % (cert, key, TOKEN), tmpdir=tmp).start()
        try:
            self.assertIn("listening on https://", d.log())
            ctx = ssl.create_default_context(cafile=cert)
            conn = http.client.HTTPSConnection("127.0.0.1", d.port, context=ctx, timeout=10)
            conn.request("POST", "/hooks/t", b'{"tls": 1}', {"Authorization": "Bearer " + TOKEN})
            resp = conn.getresponse()
            body = resp.read()
            self.assertEqual(resp.status, 202, body)
            conn.close()
            self.assertEqual(d.event(json.loads(body)["id"])["payload"], {"tls": 1})
            # a plain-HTTP client does not get an answer in clear text
            plain = http.client.HTTPConnection("127.0.0.1", d.port, timeout=5)
            with self.assertRaises((http.client.HTTPException, ConnectionError, OSError)):
                plain.request("POST", "/hooks/t", b"{}", {"Authorization": "Bearer " + TOKEN})
                plain.getresponse().read()
            plain.close()
        finally:
            self.assertEqual(d.stop(), 0)


if __name__ == "__main__":
    unittest.main()
