"""Reading ``credentials.properties``: sections, defaults, indirect values and the problems check-config reports.

Strategy: the file is plain INI (configparser, no interpolation, ``;``/``#`` comments also after values).
Every value may be indirect: ``env:NAME`` reads the environment, ``file:/path`` a file (stripped),
``cred:NAME`` the file ``$CREDENTIALS_DIRECTORY/NAME`` (systemd ``LoadCredential=``). Each section
becomes a ``Section`` with its known keys' defaults applied; unknown keys and sections are collected as
warnings, missing required keys as errors. Nothing here touches the network or the database.
"""

import configparser
import os
import stat

from .api import REQUIRED

HOOKD_KEYS = {
    "state_dir": "./var",
    "workers": "4",
    "max_body": "1048576",
    "read_timeout": "10",
    "max_connections": "64",
    "queue_limit": "10000",
    "retry.max_attempts": "8",
    "retry.base_delay": "2",
    "retry.max_delay": "600",
    "retention.days": "30",
    "shutdown_grace": "30",
    "admin.listen": "127.0.0.1:8001",
    "admin.token": "",
    "max_header_bytes": "16384",
    "max_connections_per_client": "16",
    "write_timeout": "10",
    "proxy.trusted": "",
    "log.format": "text",
    "tls.cert": "",
    "tls.key": "",
    "public_url": "",
    "alert.teams.url": "",
    "alert.command": "",
    "subscriptions.check_interval": "900",
    "min_free_mb": "500",
    "job_idle_after": "0.1",
}

# Keys every integration section accepts: the generic actions, the dedupe rule and the filter.
ACTION_KEYS = {
    "command": "",
    "command.timeout": "300",
    "command.batch": "1",
    "command.env": "",
    "forward": "",
    "forward.timeout": "30",
    "teams.url": "",
    "teams.format": "adaptive",
    "dedupe": "",
    "filter": "",
    "remote": "false",
}


class ConfigError(Exception):
    """A value that cannot be read or parsed; the message names the section and key."""


def resolve(value, environ=None):
    """Turn ``env:``/``file:``/``cred:`` values into their content; other values are returned as they are."""
    environ = os.environ if environ is None else environ
    if value.startswith("env:"):
        name = value[4:]
        if name not in environ:
            raise ConfigError("environment variable %s is not set" % name)
        return environ[name]
    if value.startswith("file:"):
        return _read_file(value[5:])
    if value.startswith("cred:"):
        base = environ.get("CREDENTIALS_DIRECTORY")
        if not base:
            raise ConfigError("cred:%s used but $CREDENTIALS_DIRECTORY is not set" % value[5:])
        name = value[5:]
        if "/" in name or name in ("", ".", ".."):
            raise ConfigError("cred: takes a plain credential name, not a path")
        return _read_file(os.path.join(base, name))
    return value


def _read_file(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as e:
        raise ConfigError("cannot read %s: %s" % (path, e.strerror))


def parse_hostport(text, what="address"):
    """"HOST:PORT" (HOST may be [v6] or empty for every address) as (host, port). Raises ConfigError."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError("%s: expected HOST:PORT, got %r" % (what, text))
    return host.strip("[]") or "0.0.0.0", int(port)


class Section:
    """One section's values, defaults applied, indirect values resolved, with typed getters."""

    def __init__(self, name, values, keys):
        self.name, self._values, self._keys = name, dict(values), keys
        self._cache = {}  # typed values; a Section never changes (a reload builds new ones)

    def get(self, key, default=None):
        if key in self._values:
            return self._values[key]
        d = self._keys.get(key, default)
        return default if d is REQUIRED else d

    def __contains__(self, key):
        return bool(self.get(key))

    def _typed(self, key, kind, conv):
        cached = self._cache.get((key, kind))
        if cached is not None:
            return cached
        raw = self.get(key)
        try:
            value = conv(raw)
        except (TypeError, ValueError):
            raise ConfigError("[%s] %s = %r is not %s" % (self.name, key, raw, kind))
        self._cache[(key, kind)] = value
        return value

    def int(self, key):
        return self._typed(key, "a whole number", int)

    def float(self, key):
        return self._typed(key, "a number", float)

    def bool(self, key):
        def conv(raw):
            low = str(raw).strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        return self._typed(key, "true or false", conv)

    def list(self, key):
        """Comma- and/or space-separated items."""
        raw = self.get(key) or ""
        return [p for p in raw.replace(",", " ").split() if p]

    def items(self):
        merged = {k: v for k, v in self._keys.items() if v is not REQUIRED}
        merged.update(self._values)
        return merged.items()


class Config:
    """The whole file: ``hookd`` (a Section), ``sections`` {name: raw dict}, ``path``, ``warnings``."""

    def __init__(self, path, parser):
        self.path = path
        self.raw = {s: dict(parser.items(s, raw=True)) for s in parser.sections()}
        self.warnings = []

    def section_names(self):
        return [s for s in self.raw if s != "hookd"]


def find_path(cli_path=None, environ=None):
    """The config file to use: --config, else $HOOKD_CONFIG, else ./credentials.properties."""
    environ = os.environ if environ is None else environ
    return cli_path or environ.get("HOOKD_CONFIG") or "credentials.properties"


def load(path):
    """Parse the file (or nothing, if ``path`` is None or missing). Raises ConfigError on syntax errors."""
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"),
                                       strict=True, default_section="\0none")
    parser.optionxform = str  # keys keep their case ("Device name" style keys are not used, but be exact)
    exists = bool(path) and os.path.exists(path)
    if exists:
        try:
            with open(path, encoding="utf-8") as f:
                parser.read_file(f)
        except (configparser.Error, UnicodeDecodeError) as e:
            raise ConfigError("%s: %s" % (path, str(e).splitlines()[0]))
        except OSError as e:
            raise ConfigError("cannot read %s: %s" % (path, e.strerror))
    cfg = Config(path if exists else None, parser)
    if exists:
        mode = os.stat(path).st_mode
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            cfg.warnings.append("%s is readable by group or others; chmod 600 it" % path)
    return cfg


def make_section(name, raw, keys, problems, warnings):
    """Build a Section from raw values: unknown keys are warnings, missing required keys and unreadable
    indirect values are problems (appended to the lists given)."""
    values = {}
    for key, value in raw.items():
        if key not in keys:
            warnings.append("[%s] unknown key %s" % (name, key))
        try:
            values[key] = resolve(value.strip())
        except ConfigError as e:
            problems.append("[%s] %s: %s" % (name, key, e))
    for key, default in keys.items():
        if default is REQUIRED and not values.get(key):
            problems.append("[%s] %s is required" % (name, key))
    return Section(name, values, keys)
