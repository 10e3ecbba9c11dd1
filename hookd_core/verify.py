"""Signature and credential checks for webhook senders: one pure function per scheme, over the raw body.

Strategy: every scheme function takes the request headers (anything with a ``get``; an
``email.message.Message`` or a dict), the exact body bytes received, and the list of secrets configured
(several, space-separated in the file, so a secret can be rotated without downtime). It returns None
when one secret matches and raises ``BadSignature`` (401) otherwise. Malformed headers (bad base64, no
``t=``, a timestamp that is not a number) are a 401 too, never an exception escaping to a 500. Every
comparison is ``hmac.compare_digest`` over bytes. Timestamped schemes take ``now`` so tests can pin the
clock. ``verify(conf, ...)`` dispatches on ``conf.get("verify")`` (``checker(conf)`` reads the section
once, for a handler to keep); ``check(conf)`` lists configuration problems for check-config;
``default_dedupe(scheme)`` names each sender's delivery id. Each configured secret's HMAC key is set up
once (``_Key``), not per request.
"""

import base64
import binascii
import functools
import hashlib
import hmac
import ipaddress
import re
import sys
import time

from .api import BadSignature, Headers

SCHEMES = ("standard-webhooks", "github", "stripe", "shopify", "hmac", "token", "none")
ALGORITHMS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha512": hashlib.sha512}
ENCODINGS = ("hex", "base64")
MAX_SIGNATURES = 8  # signature entries looked at per header; rotation needs two or three, not hundreds
MAX_ED25519 = 4     # v1a entries checked per request: each costs milliseconds of CPU before any auth

# What each sender sends once per event and repeats on every redelivery: webhook-id (Standard Webhooks
# spec), X-GitHub-Delivery (https://docs.github.com/en/webhooks/webhook-events-and-payloads), the event id
# (https://docs.stripe.com/webhooks#handle-duplicate-events), X-Shopify-Webhook-Id
# (https://shopify.dev/docs/apps/build/webhooks/ignore-duplicates).
DEFAULT_DEDUPE = {
    "standard-webhooks": "header:webhook-id",
    "github": "header:X-GitHub-Delivery",
    "shopify": "header:X-Shopify-Webhook-Id",
    "stripe": "json:id",
}


# The same delivery id under another header name: Svix and the senders built on it (Clerk, Resend) send
# svix-* instead of webhook-* (svix/svix-webhooks python/svix/webhooks.py, Webhook.verify).
DEFAULT_DEDUPE_ALIASES = {"header:webhook-id": "header:svix-id"}

# Standard Webhooks' three headers, and Svix's names for them; a request uses one set whole.
STANDARD_HEADERS = (("webhook-id", "webhook-timestamp", "webhook-signature"),
                    ("svix-id", "svix-timestamp", "svix-signature"))


def default_dedupe(scheme):
    """The dedupe rule a sender using ``scheme`` needs: its delivery id, else the body hash."""
    return DEFAULT_DEDUPE.get(scheme, "body")


def header(headers, name):
    """The value of header ``name`` (case-insensitive), stripped, or None."""
    value = headers.get(name)
    if value is None:
        if not isinstance(headers, dict):
            return None
        wanted = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == wanted), None)
    return value.strip() if isinstance(value, str) else None


def _require(headers, name):
    value = header(headers, name)
    if not value:
        raise BadSignature("missing %s header" % name)
    return value


def _utf8(text):
    return text.encode("utf-8")


def _any_equal(expected, candidates):
    """True when one of ``candidates`` (bytes) equals ``expected`` (bytes); constant time per pair."""
    found = False
    for candidate in candidates[:MAX_SIGNATURES]:
        if hmac.compare_digest(expected, candidate):
            found = True
    return found


def _mac(secret, message, algorithm="sha256"):
    """HMAC(secret, message) with ``algorithm`` (bytes)."""
    return _key(secret, algorithm).digest(message)


_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


class _Key:
    """One secret set up for HMAC (RFC 2104, as CPython's hmac module does it): the hash states after
    the key's inner and outer pads are computed once, so a message costs two state copies and its two
    hashes, not a fresh HMAC object each time. With a ``lead``, ``digest(m)`` is the HMAC of lead + m."""

    __slots__ = ("inner", "outer")

    def __init__(self, secret, algorithm, lead=b""):
        new = ALGORITHMS[algorithm]
        block = new().block_size
        if len(secret) > block:
            secret = new(secret).digest()
        secret = secret.ljust(block, b"\0")
        self.inner, self.outer = new(secret.translate(_IPAD) + lead), new(secret.translate(_OPAD))

    def digest(self, message):
        inner, outer = self.inner.copy(), self.outer.copy()
        inner.update(message)
        outer.update(inner.digest())
        return outer.digest()


@functools.lru_cache(maxsize=256)
def _key(secret, algorithm, lead=b""):
    """The ``_Key`` of one configured secret (secrets come from the configuration: a handful), its inner
    state already past ``lead``, the literal text every signed message of a template begins with."""
    return _Key(secret, algorithm, lead)


def _decode(text, encoding):
    """Signature text to bytes, or None when it is not valid ``encoding``. Base64 in its strict form (only
    the alphabet, padding only at the end: what senders send) is decoded in one C call; anything else
    goes through ``b64decode(validate=True)``, which decides as before (what strict mode takes, it takes
    too, with the same bytes)."""
    try:
        if encoding == "hex":
            return bytes.fromhex(text)
        if _STRICT_BASE64:
            try:
                return binascii.a2b_base64(text, strict_mode=True)
            except binascii.Error:
                pass
        return base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        return None


_STRICT_BASE64 = sys.version_info >= (3, 11)  # binascii's strict_mode came in 3.11; before it, b64decode alone


def _check_timestamp(value, tolerance, now):
    """Raise BadSignature unless ``value`` is whole Unix seconds within ``tolerance`` of ``now``."""
    if not (value and len(value) <= 12 and value.isascii() and value.isdigit()):  # [0-9]{1,12}
        raise BadSignature("timestamp is not a number of seconds")
    now = time.time() if now is None else now
    if tolerance and abs(now - int(value)) > tolerance:
        raise BadSignature("timestamp outside the tolerance of %ds" % tolerance)


# -- Standard Webhooks (https://github.com/standard-webhooks/standard-webhooks, spec/standard-webhooks.md) -

@functools.lru_cache(maxsize=256)
def _whsec_or_none(secret):
    """``whsec_key(secret)``, or None for a secret that is not one (check() reports it)."""
    try:
        return whsec_key(secret)
    except ValueError:
        return None


def whsec_key(secret):
    """The HMAC key of a Standard Webhooks secret (``whsec_`` + base64), or ValueError."""
    raw = secret[len("whsec_"):] if secret.startswith("whsec_") else secret
    try:
        key = base64.b64decode(raw, validate=True)
    except binascii.Error:
        raise ValueError("not base64 after whsec_")
    if not key:
        raise ValueError("empty key")
    return key


def standard_webhooks(headers, body, secrets, tolerance=300, now=None):
    """``webhook-signature: v1,<base64> [v1,<base64> ...]`` = HMAC-SHA256(key, id.timestamp.body)
    (https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md); the
    svix-* names are accepted too. ``v1a,<base64>`` entries (ed25519) are checked against ``whpk_`` secrets."""
    return _standard(headers, body, _standard_keys(tuple(secrets)), tolerance, now)


@functools.lru_cache(maxsize=64)
def _standard_keys(secrets):
    """Each configured secret as the check uses it, in order: (its prepared HMAC ``_Key``, None) for a
    ``whsec_`` secret, (None, the secret) for a ``whpk_`` one; a secret that is neither matches nothing
    (check() reports it) and is left out."""
    keys = []
    for secret in secrets:
        if secret.startswith("whpk_"):
            keys.append((None, secret))
            continue
        key = _whsec_or_none(secret)
        if key is not None:
            keys.append((_key(key, "sha256"), None))
    return tuple(keys)


def _standard(headers, body, keys, tolerance, now):
    """``standard_webhooks`` with the secrets already prepared (``_standard_keys``; a handler's checker
    prepares them once)."""
    msg_id, stamp, entries = standard_headers(headers)
    _check_timestamp(stamp, tolerance, now)
    message = ("%s.%s." % (msg_id, stamp)).encode("utf-8") + body
    v1, v1a = [], []
    for entry in entries.split():
        if entry.startswith("v1,"):
            signature = _decode(entry[3:], "base64")
            if signature:
                v1.append(signature)
        elif entry.startswith("v1a,"):
            signature = _decode(entry[4:], "base64")
            if signature:
                v1a.append(signature)
    for key, public in keys:
        if key is not None:
            if _any_equal(key.digest(message), v1):
                return
        elif _ed25519_any(public, message, v1a):
            return
    raise BadSignature("no webhook-signature entry matches")


def standard_headers(headers):
    """(id, timestamp, signature) from the webhook-* headers, or else from the svix-* ones (whichever
    set is complete; never a mix), or BadSignature naming what is missing."""
    for names in STANDARD_HEADERS:
        values = _headers3(headers, names)
        if values is not None:
            return values
    return [_require(headers, name) for name in STANDARD_HEADERS[0]]


def _headers3(headers, names):
    """``header`` of each of three names, or None unless all three are there (and not blank). An
    ``api.Headers`` is looked up in its index of first values directly (names here are lower-case)."""
    if headers.__class__ is Headers:
        get = headers.first.get
        values = get(names[0]), get(names[1]), get(names[2])
        if not (values[0] and values[1] and values[2]):
            return None
        values = values[0].strip(), values[1].strip(), values[2].strip()
    else:
        values = header(headers, names[0]), header(headers, names[1]), header(headers, names[2])
    return values if values[0] and values[1] and values[2] else None


def _ed25519_any(secret, message, signatures):
    try:
        public = base64.b64decode(secret[len("whpk_"):], validate=True)
    except binascii.Error:
        return False
    return any(ed25519_verify(public, message, s) for s in signatures[:MAX_ED25519])


# -- ed25519 verification (RFC 8032 §5.1.7), for Standard Webhooks v1a --------------------------------
# Not in CPython's stdlib; this is the RFC's reference arithmetic in extended coordinates. It is slow
# (a few milliseconds per signature) but webhooks arrive at human rates. Verification handles only public
# data, so it needs no constant-time care.

_P = 2 ** 255 - 19
_L = 2 ** 252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _recover_x(y, sign):
    if y >= _P:
        return None
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P) % _P
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P:
        return None
    return _P - x if (x & 1) != sign else x


def _point(encoded):
    """A 32-byte compressed point to extended coordinates (X, Y, Z, T), or None."""
    if len(encoded) != 32:
        return None
    n = int.from_bytes(encoded, "little")
    y, sign = n & ((1 << 255) - 1), n >> 255
    x = _recover_x(y, sign)
    return None if x is None else (x, y, 1, x * y % _P)


def _add(p, q):
    a = (p[1] - p[0]) * (q[1] - q[0]) % _P
    b = (p[1] + p[0]) * (q[1] + q[0]) % _P
    c = 2 * p[3] * q[3] * _D % _P
    d = 2 * p[2] * q[2] % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _mul(n, p):
    q = (0, 1, 1, 0)
    while n:
        if n & 1:
            q = _add(q, p)
        p, n = _add(p, p), n >> 1
    return q


def _same(p, q):
    return (p[0] * q[2] - q[0] * p[2]) % _P == 0 and (p[1] * q[2] - q[1] * p[2]) % _P == 0


_G = _point((4 * pow(5, _P - 2, _P) % _P).to_bytes(32, "little"))  # the base point, y = 4/5


def ed25519_verify(public, message, signature):
    """True when ``signature`` (64 bytes) is ``public``'s (32 bytes) ed25519 signature of ``message``."""
    if len(signature) != 64:
        return False
    a, r = _point(public), _point(signature[:32])
    s = int.from_bytes(signature[32:], "little")
    if a is None or r is None or s >= _L:
        return False
    h = int.from_bytes(hashlib.sha512(signature[:32] + public + message).digest(), "little") % _L
    return _same(_mul(s, _G), _add(r, _mul(h, a)))


# -- GitHub, Stripe, Shopify (https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries,
# https://docs.stripe.com/webhooks#verify-manually, https://shopify.dev/docs/apps/build/webhooks) -------

def github(headers, body, secrets):
    """``X-Hub-Signature-256: sha256=<hex HMAC-SHA256(secret, body)>``."""
    value = _require(headers, "X-Hub-Signature-256")
    if not value.startswith("sha256="):
        raise BadSignature("X-Hub-Signature-256 does not start with sha256=")
    given = _decode(value[7:], "hex")
    if given is None:
        raise BadSignature("X-Hub-Signature-256 is not hex")
    if not any(_any_equal(_mac(_utf8(s), body), [given]) for s in secrets):
        raise BadSignature("X-Hub-Signature-256 does not match")


def parse_stripe(value):
    """``t=123,v1=abc,v1=def,v0=...`` → (t, [v1 bytes]); BadSignature when malformed."""
    stamp, v1 = None, []
    for item in value.split(","):
        key, sep, val = item.strip().partition("=")
        if not sep:
            raise BadSignature("Stripe-Signature item without '='")
        if key == "t":
            stamp = val
        elif key == "v1":
            decoded = _decode(val, "hex")
            if decoded:
                v1.append(decoded)
    if stamp is None or not v1:
        raise BadSignature("Stripe-Signature needs t= and at least one v1=")
    return stamp, v1


def stripe(headers, body, secrets, tolerance=300, now=None):
    """``Stripe-Signature: t=<ts>,v1=<hex HMAC-SHA256(secret, "t.body")>[,v1=...]``."""
    stamp, given = parse_stripe(_require(headers, "Stripe-Signature"))
    _check_timestamp(stamp, tolerance, now)
    message = _utf8(stamp) + b"." + body
    if not any(_any_equal(_mac(_utf8(s), message), given) for s in secrets):
        raise BadSignature("no Stripe-Signature v1 matches")


def shopify(headers, body, secrets):
    """``X-Shopify-Hmac-Sha256: <base64 HMAC-SHA256(secret, body)>``."""
    given = _decode(_require(headers, "X-Shopify-Hmac-Sha256"), "base64")
    if given is None:
        raise BadSignature("X-Shopify-Hmac-Sha256 is not base64")
    if not any(_any_equal(_mac(_utf8(s), body), [given]) for s in secrets):
        raise BadSignature("X-Shopify-Hmac-Sha256 does not match")


# -- generic HMAC recipe -------------------------------------------------------------------------------

PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def template_problems(template):
    """Unknown placeholders in a signature.message template (only {body} and {header:NAME} exist)."""
    return ["unknown placeholder {%s} in signature.message" % name
            for name in PLACEHOLDER.findall(template)
            if name != "body" and not (name.startswith("header:") and name[7:].strip())]


def build_message(template, headers, body):
    """The bytes to sign: the template with {body} replaced by the raw body bytes and {header:NAME} by
    that header's value. Literal text is UTF-8, so a non-UTF-8 body still verifies byte for byte."""
    out = []
    for part in _template_parts(template):
        if part is None:
            out.append(body)
        elif isinstance(part, str):
            value = header(headers, part)
            if value is None:
                raise BadSignature("header %s (signed) is missing" % part)
            out.append(_utf8(value))
        else:
            out.append(part)
    return b"".join(out)


@functools.lru_cache(maxsize=64)
def _template_parts(template):
    """A template split once (templates come from the configuration): literal text as bytes, None for
    {body}, a header's name (str) for {header:NAME}; an unknown placeholder stays literal text."""
    parts, pos = [], 0
    for m in PLACEHOLDER.finditer(template):
        parts.append(_utf8(template[pos:m.start()]))
        name = m.group(1)
        if name == "body":
            parts.append(None)
        elif name.startswith("header:"):
            parts.append(name[7:].strip())
        else:
            parts.append(_utf8(m.group(0)))
        pos = m.end()
    parts.append(_utf8(template[pos:]))
    return tuple(part for part in parts if part != b"")


_SEPARATORS = re.compile(r"[,\s]+")


def hmac_scheme(headers, body, secrets, name, prefix="", encoding="hex", algorithm="sha256",
                template="{body}"):
    """HMAC(secret, template) in header ``name``, after ``prefix``; several signatures may be given,
    separated by commas or spaces (adnanh/webhook does the same)."""
    value = _require(headers, name)
    # One signature (the usual case) without the regex (1.2 µs): every character \s matches but the
    # space is not printable, so such a value holds no separator.
    one = value.isprintable() and " " not in value and "," not in value
    given = []
    for item in [value] if one else _SEPARATORS.split(value)[:MAX_SIGNATURES]:
        if prefix and not item.startswith(prefix):
            continue
        decoded = _decode(item[len(prefix):], encoding)
        if decoded:
            given.append(decoded)
    if not given:
        after = " after " + prefix if prefix else ""
        raise BadSignature("%s holds no %s signature%s" % (name, encoding, after))
    lead = _literal_lead(template)
    message = body if lead is not None else build_message(template, headers, body)
    for secret in secrets:
        if _any_equal(_key(_utf8(secret), algorithm, lead or b"").digest(message), given):
            return
    raise BadSignature("%s does not match" % name)


def hex_hmac_checker(secrets, name, template="{body}"):
    """``hmac_scheme`` (hex, SHA-256) for one configuration, for a handler to keep: a function (headers,
    body) that returns None or raises BadSignature. The usual header, one signature of 64 hex digits, with a template that
    is literal text and then the body (Preservica's), is checked against each secret's prepared key
    (``_Key``, set up here once, not looked up per request) without the general recipe's separators,
    prefix and template handling (3.2 -> 2.2 µs a 1.2 KB Preservica delivery, measured alone; the keys
    kept here instead of looked up a request: 2.5 -> 2.15). Anything else, a mismatch included, is
    decided by ``hmac_scheme``, so the answer and its reason are the same."""
    secrets, lead = list(secrets), _literal_lead(template)
    keys = [] if lead is None else [_key(_utf8(secret), "sha256", lead) for secret in secrets]

    def check(headers, body):
        value = headers.get(name)
        if keys and value.__class__ is str and len(value) == 64:
            try:
                given = bytes.fromhex(value)  # 32 bytes only when all 64 characters are hex digits
            except ValueError:
                given = b""
            for key in keys:
                if hmac.compare_digest(key.digest(body), given):
                    return
        hmac_scheme(headers, body, secrets, name, template=template)
    return check


@functools.lru_cache(maxsize=64)
def _literal_lead(template):
    """For a template that is literal text and then the body (Preservica's "preservica-webhook-auth{body}",
    or "{body}"), that text: its hash goes into the key's prepared state, so a request hashes only its
    body, without building the message (a copy of the body) first (4.1 -> 3.2 µs a 1.2 KB Preservica
    delivery, measured alone). None for any other template."""
    parts = _template_parts(template)
    if parts and parts[-1] is None and all(isinstance(part, bytes) for part in parts[:-1]):
        return b"".join(parts[:-1])
    return None


# -- static token or HTTP basic auth -------------------------------------------------------------------

def token(headers, body, secrets, name="Authorization"):
    """The token in header ``name``: the bare token, ``Bearer <token>``, or HTTP basic auth whose password
    (or whole ``user:password``) is the token."""
    value = _require(headers, name)
    candidates = [_utf8(value)]
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "bearer":
        candidates.append(_utf8(rest.strip()))
    elif scheme.lower() == "basic":
        decoded = _decode(rest.strip(), "base64") or b""
        candidates.append(decoded)
        candidates.append(decoded.partition(b":")[2])
    if not any(_any_equal(_utf8(s), candidates) for s in secrets):
        raise BadSignature("%s does not hold a valid token" % name)


# -- shared secrets that are not signatures: a header, or a URL path segment -------------------------

def secret_header(headers, secrets, names):
    """For senders that present a shared secret instead of signing (iconik's custom webhook header,
    Zencoder's notification secret): one of the headers ``names`` must hold one of ``secrets`` (bare,
    ``Bearer``, or HTTP basic auth, as ``token`` reads it). BadSignature otherwise."""
    for name in names:
        if header(headers, name) is not None:
            try:
                return token(headers, b"", secrets, name)
            except BadSignature:
                continue
    raise BadSignature("missing or wrong %s" % " / ".join(names))


def path_secret(given, secret):
    """For senders that can only be given a URL (Camio, IXON): the secret path segment ``given`` must
    equal ``secret``, compared in constant time. BadSignature otherwise (the message never holds either)."""
    if not secret or not hmac.compare_digest(_utf8(given or ""), _utf8(secret)):
        raise BadSignature("wrong key in the path")


def networks(text):
    """``allow.from`` text (CIDRs or addresses, comma- or space-separated) → list of ip_network;
    ValueError naming the bad item."""
    out = []
    for item in (text or "").replace(",", " ").split():
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError("%r is not an address or CIDR" % item)
    return out


def client_allowed(client, allowed):
    """True when the client address (``req.client``) is in one of the ``allowed`` networks (an IPv4
    address seen as ::ffff:a.b.c.d counts as a.b.c.d)."""
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in net for net in allowed)


# -- configuration glue --------------------------------------------------------------------------------

def secrets_of(conf):
    return (conf.get("secret") or "").split()


def _tolerance(conf):
    try:
        return int(conf.get("tolerance") or 300)
    except ValueError:
        return 300  # check() reports it


def verify(conf, headers, body, now=None):
    """Check one request against the section ``conf`` (``verify``, ``secret``, ...). BadSignature if not."""
    return checker(conf)(headers, body, now)


def checker(conf):
    """``verify`` for one section, with what depends on the configuration alone (the scheme, the secrets,
    the tolerance, the recipe) read once: a function (headers, body, now=None) that returns None or
    raises BadSignature. A handler builds it when it is built (a reload builds new handlers)."""
    scheme = (conf.get("verify") or "").strip()
    secrets = secrets_of(conf)
    if scheme == "none":
        if not _truthy(conf.get("allow_unsigned")):
            return _refusal("verify = none without allow_unsigned = true")
        return lambda headers, body, now=None: None
    if not secrets:
        return _refusal("no secret configured")
    if scheme == "standard-webhooks":
        keys, tolerance = _standard_keys(tuple(secrets)), _tolerance(conf)
        return lambda headers, body, now=None: _standard(headers, body, keys, tolerance, now)
    if scheme == "stripe":
        tolerance = _tolerance(conf)
        return lambda headers, body, now=None: stripe(headers, body, secrets, tolerance, now)
    if scheme in ("github", "shopify"):
        plain = github if scheme == "github" else shopify
        return lambda headers, body, now=None: plain(headers, body, secrets)
    if scheme == "hmac":
        recipe = (conf.get("signature.header") or "", conf.get("signature.prefix") or "", _enc(conf), _alg(conf),
                  conf.get("signature.message") or "{body}")
        return lambda headers, body, now=None: hmac_scheme(headers, body, secrets, *recipe)
    if scheme == "token":
        name = conf.get("token.header") or "Authorization"
        return lambda headers, body, now=None: token(headers, body, secrets, name)
    return _refusal("unknown verify scheme")


def _refusal(reason):
    def refuse(headers, body, now=None):
        raise BadSignature(reason)
    return refuse


def _enc(conf):
    return (conf.get("signature.encoding") or "hex").strip().lower()


def _alg(conf):
    return (conf.get("signature.algorithm") or "sha256").strip().lower()


def _truthy(value):
    return str(value or "").strip().lower() in ("1", "true", "yes", "on")


def check(conf):
    """Configuration problems of a verifying section, one string each (empty list: fine)."""
    scheme = (conf.get("verify") or "").strip()
    if scheme not in SCHEMES:
        return ["verify = %r is not one of %s" % (scheme, ", ".join(SCHEMES))]
    if scheme == "none":
        return [] if _truthy(conf.get("allow_unsigned")) else [
            "verify = none accepts anything; set allow_unsigned = true to allow it"]
    problems = [] if secrets_of(conf) else ["secret is required for verify = %s" % scheme]
    timestamped = scheme in ("standard-webhooks", "stripe")
    if timestamped and not re.fullmatch(r"[0-9]+", conf.get("tolerance") or "300"):
        problems.append("tolerance must be a whole number of seconds")
    if scheme == "standard-webhooks":
        problems += _whsec_problems(secrets_of(conf))
    if scheme == "hmac":
        problems += _hmac_problems(conf)
    return problems


def _whsec_problems(secrets):
    problems = []
    for i, secret in enumerate(secrets, 1):
        try:
            if secret.startswith("whpk_"):
                if len(base64.b64decode(secret[5:], validate=True)) != 32:
                    raise ValueError("a whpk_ key must be 32 bytes")
            else:
                whsec_key(secret)
        except (ValueError, binascii.Error) as e:
            problems.append("secret #%d is not a valid Standard Webhooks secret (%s)" % (i, e))
    return problems


def _hmac_problems(conf):
    problems = []
    if not (conf.get("signature.header") or "").strip():
        problems.append("signature.header is required for verify = hmac")
    if _enc(conf) not in ENCODINGS:
        problems.append("signature.encoding must be hex or base64")
    if _alg(conf) not in ALGORITHMS:
        problems.append("signature.algorithm must be sha1, sha256 or sha512")
    return problems + template_problems(conf.get("signature.message") or "{body}")
