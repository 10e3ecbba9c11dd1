"""What of a request may be kept: the headers stored with an event, without any credential.

Strategy: a header is dropped when its name says it carries a credential (Authorization, Cookie, or a
name containing signature, secret, token, hmac, api-key or password), when the route names it as its
credential header in its configuration (every ``*.header`` key: ``signature.header``, ``token.header``,
``secret.header``), when its value is an HTTP credential whatever the name (``Basic``, ``Bearer``,
``Digest`` and the other authentication schemes followed by a token), or when it holds one of hookd's
secret values. What is stored is what ``/events``, the CLI and a command's stdin show, so nothing here may
ever hold a secret.
"""

import json
import re
from json.encoder import encode_basestring_ascii as _string

SENSITIVE = ("authorization", "cookie", "signature", "secret", "token", "hmac", "api-key", "apikey", "password")
_SENSITIVE = re.compile("|".join(SENSITIVE))
# An authentication scheme (RFC 9110 §11.4: the IANA registry and common token schemes) followed by its
# credentials, a token68 alone or auth-params ("Digest username=..."); "Digest of the day" is not one.
_CREDENTIAL_VALUE = re.compile(r"^\s*(?:basic|bearer|digest|token|negotiate|ntlm|hoba|mutual|vapid|scram-sha-\d+"
                               r"|aws4-hmac-sha256|oauth|apikey|dpop)\s+(?:[A-Za-z0-9._~+/-]+=*\s*$"
                               r"|[!#$%&'*+.^_`|~0-9A-Za-z-]+\s*=)", re.I)


def credential_headers(conf):
    """Lower-case names of the headers a section's configuration names as credentials (``*.header``)."""
    return {str(value).strip().lower() for key, value in conf.items()
            if key.endswith(".header") and value and str(value).strip()}


_NAMES = {}  # header name as sent -> its lower-case form, or "" when the name says credential
_MAX_NAMES = 4096  # names are the client's choice: the cache is emptied rather than grown past this
_SHORT = 200  # characters: only names and pairs this short are remembered (those that repeat are short)


def stored_headers(headers, secrets, credential_headers=()):
    """Headers worth keeping (lower-case names), without credentials, signatures or secret values."""
    out = {}
    for name, value in headers.items():
        low = _kept_name(name, value, secrets, credential_headers)
        if low:
            out[low] = value
    return out


def _kept_name(name, value, secrets, credential_headers):
    """The lower-case name a header is kept under, or "" when it is not kept."""
    low = _NAMES.get(name)
    if low is None:
        low = "" if _SENSITIVE.search(name.lower()) else name.lower()
        if len(name) <= _SHORT:
            if len(_NAMES) >= _MAX_NAMES:
                _NAMES.clear()
            _NAMES[name] = low
    return low if low and low not in credential_headers and _value_kept(value, secrets) else ""


def _value_kept(value, secrets):
    """False when a header's value is an HTTP credential or holds a secret, whatever its name."""
    # _CREDENTIAL_VALUE needs whitespace after the scheme, and every character \s matches but the space
    # is not printable: a printable value without a space is no credential, and skips the regex
    if not (value.isprintable() and " " not in value) and _CREDENTIAL_VALUE.match(value):
        return False
    for secret in secrets:
        if secret in value:
            return False
    return True


class StoredHeaders:
    """``stored_headers`` of one route's requests as the JSON text stored with their events (exactly
    ``json.dumps(stored_headers(...))``), for a configuration's secrets and credential headers. Most
    headers come again and again with the same value (Host, Content-Type, User-Agent), and the others
    change with every request (a delivery id): so each name keeps the last value it came with and that
    pair's verdict and JSON, which the next request with the same pair reuses and one with a new value
    replaces, where a cache of every pair seen filled up with delivery ids and was emptied every ~250
    requests; a new value of a remembered name has only the value judged, and the name's JSON is
    reused. A header dropped for its name alone (a signature) is skipped before any of that; a pair
    dropped for its value (a credential, a secret) is never remembered. Names and values are the
    client's choice, so only short pairs are kept, for at most ``MAX_PAIRS`` names, and the lot is
    forgotten rather than grown past that."""

    MAX_PAIRS = 256

    def __init__(self, secrets, credential_headers):
        self.secrets, self.credential_headers = tuple(secrets), frozenset(credential_headers)
        # header name as sent -> (its last value, the pair's JSON member '"name": "value"', the name's '"name": ')
        self._pairs = {}

    def json(self, headers):
        """The JSON text for ``headers`` (an ``api.Headers``)."""
        items = headers.items()
        if headers.repeated:  # a name sent twice: a dict keeps its last value, in its first place
            return json.dumps(stored_headers(headers, self.secrets, self.credential_headers))
        pairs, members, names = self._pairs, [], _NAMES
        for name, value in items:
            if names.get(name) == "":
                continue  # a credential by its name (a signature): never kept, whatever the value
            last = pairs.get(name)
            if last is not None:  # a name kept before: only the value is left to judge
                if last[0] == value:
                    members.append(last[1])
                    continue
                if not _value_kept(value, self.secrets):
                    continue  # not kept (a credential value, a secret): not remembered either
                lead = last[2]
            else:
                low = _kept_name(name, value, self.secrets, self.credential_headers)
                if not low:
                    continue
                lead = _string(low) + ": "
            member = lead + _string(value)
            if len(name) + len(value) <= _SHORT:
                if len(pairs) >= self.MAX_PAIRS:
                    pairs.clear()
                pairs[name] = (value, member, lead)
            members.append(member)
        return "{" + ", ".join(members) + "}"
