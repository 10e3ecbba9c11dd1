"""The one outbound HTTP client every job uses: bounded, no redirects, errors that say retry or give up.

Strategy: ``request()`` opens one ``http.client`` connection per call (jobs are few and slow compared
with intake), sends the body with Content-Length, reads at most ``max_body`` bytes of the answer, and
returns a ``Reply``. Redirects are never followed: a 3xx is returned like any other status, so a sender
cannot bounce hookd to a host nobody allowed. A socket error or timeout raises ``NetworkError``, which is
a ``Retry``. ``allowed_hosts`` refuses any other host with ``Fail`` before a byte is sent (SSRF guard).
"""

import http.client
import socket
import ssl
import urllib.parse

from .api import Fail, Retry

MAX_REPLY = 64 * 1024 * 1024  # thumbnails and API answers; anything larger is not what we asked for


class NetworkError(Retry):
    """Could not reach the upstream, or it did not answer in time: worth retrying."""


class Reply:
    """status (int), headers (http.client.HTTPMessage), body (bytes), and ``json()``."""

    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    @property
    def ok(self):
        return 200 <= self.status < 300

    def json(self):
        import json
        try:
            return json.loads(self.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise Retry("upstream answered %d with a body that is not JSON" % self.status)


def split_url(url):
    """(scheme, host, port, path-with-query) of an http(s) URL, or Fail."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Fail("not an http(s) URL: %s" % redact_url(url))
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.scheme, parts.hostname, port, path


def redact_url(url):
    """The URL without user:password, for log lines."""
    parts = urllib.parse.urlsplit(url)
    if parts.password or parts.username:
        netloc = parts.hostname + (":%d" % parts.port if parts.port else "")
        parts = parts._replace(netloc="***@" + netloc)
    return urllib.parse.urlunsplit(parts._replace(query="")) if parts.query else urllib.parse.urlunsplit(parts)


def request(method, url, headers=None, body=None, timeout=30, allowed_hosts=None, max_body=MAX_REPLY,
            context=None):
    """Send one request and return a Reply. Raises NetworkError (retry) or Fail (host not allowed)."""
    scheme, host, port, path = split_url(url)
    if allowed_hosts is not None and host.lower() not in {h.lower() for h in allowed_hosts}:
        raise Fail("host %s is not in the allowed hosts" % host)
    if scheme == "https":
        conn = http.client.HTTPSConnection(host, port, timeout=timeout,
                                           context=context or ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    hdrs = dict(headers or {})
    if body is not None and not isinstance(body, bytes):
        body = body.encode("utf-8")
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read(max_body + 1)
        if len(data) > max_body:
            raise Retry("upstream answer larger than %d bytes" % max_body)
        return Reply(resp.status, resp.headers, data)
    except (OSError, http.client.HTTPException, socket.timeout) as e:
        raise NetworkError("%s %s:%d failed: %s" % (method, host, port, e.__class__.__name__ + (
            ": %s" % e if str(e) else "")))
    finally:
        conn.close()
