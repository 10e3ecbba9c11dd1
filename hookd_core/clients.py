"""Who the client is: the peer's address, or the address a trusted reverse proxy forwards for.

Strategy: ``proxy.trusted`` is a list of CIDRs (``networks``). A peer outside it is the client,
whatever headers it sends (anyone can write X-Forwarded-For). From a peer inside it, the client is
taken from ``X-Forwarded-For`` (every field line, in order) or, when that is absent, from
``Forwarded``'s ``for=`` (RFC 7239): walking the list from the right, each hop that is itself a trusted
proxy is skipped, and the first address that is not is the client (a proxy appends what it saw, so
only the right end was written by hands we trust). A hop that is not an address (``unknown``, an
obfuscated name) ends the walk at the trusted hop after it. The client address then feeds the
per-client connection limit, the log lines and ``req.client``; trusted proxies themselves are exempt
from the per-client limit at accept time.
"""

import ipaddress

from .config import ConfigError


def networks(text):
    """``proxy.trusted`` as a list of ip_network. Raises ConfigError naming the bad item."""
    out = []
    for item in text.replace(",", " ").split():
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError("[hookd] proxy.trusted: %r is not an address or CIDR" % item)
    return out


def _ip(text):
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return ip.ipv4_mapped or ip if ip.version == 6 else ip


def trusted(peer, nets):
    """True when ``peer`` (an address string) is inside one of ``nets``."""
    if not nets:
        return False
    ip = _ip(peer)
    return ip is not None and any(ip in n for n in nets)


def client_address(peer, headers, nets):
    """The client's address for a request from ``peer`` carrying ``headers`` (api.Headers)."""
    if not nets or not trusted(peer, nets):
        return peer
    hops = forwarded_hops(headers)
    client = peer
    for hop in reversed(hops):
        ip = _ip(hop) if hop else None
        if ip is None:
            return client
        client = str(ip)
        if not any(ip in n for n in nets):
            return client
    return client


def forwarded_hops(headers):
    """The forwarded-for list, left (the original client) to right (the last proxy's peer)."""
    xff = headers.get_all("X-Forwarded-For")
    if xff:
        return [h.strip(" \t") for line in xff for h in line.split(",")]
    hops = []
    for line in headers.get_all("Forwarded") or ():
        for element in line.split(","):
            hop = ""
            for pair in element.split(";"):
                name, _, value = pair.strip(" \t").partition("=")
                if name.lower() == "for":
                    hop = _node(value.strip(" \t").strip('"'))
            hops.append(hop)
    return hops


def _node(value):
    """RFC 7239 node: ``192.0.2.1``, ``192.0.2.1:80``, ``[2001:db8::1]:80``, or a name (returned as is)."""
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value
