"""The documentation tells the truth: every configuration key the code knows is in the template, under its
section, and parses; the README names every subcommand and quotes the test command CI runs."""

import configparser
import os
import re
import unittest

from hookd_core import config
from hookd_core.app import discover

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def template():
    p = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"))
    p.optionxform = str
    with open(os.path.join(ROOT, "credentials.properties.template")) as f:
        p.read_file(f)
    return p


class DocsTest(unittest.TestCase):
    def test_every_key_is_in_the_template(self):
        t = template()
        self.assertEqual(set(t["hookd"]), set(config.HOOKD_KEYS))
        for key, default in config.HOOKD_KEYS.items():
            self.assertEqual(t["hookd"][key], default, "default of [hookd] %s" % key)
        for section, cls in discover().items():
            name = "hook:NAME" if section == "hook:" else section
            self.assertIn(name, t.sections())
            missing = set(cls.KEYS) - set(t[name])
            self.assertEqual(missing, set(), "[%s] keys missing from the template" % name)
        generic = set(t["hook:NAME"])
        self.assertEqual(set(config.ACTION_KEYS) - generic, set(), "generic action keys missing")

    def test_readme_names_commands_and_the_test_command(self):
        with open(os.path.join(ROOT, "README.md")) as f:
            readme = f.read()
        for cmd in ("check-config", "events", "event ", "retry", "replay", "prune", "test-recording",
                    "ixon-configure", "zencoder-submit", "worker --from", "subscribe preservica", "subscribe iconik",
                    "subscriptions --json", "unsubscribe"):
            self.assertIn(cmd, readme)
        with open(os.path.join(ROOT, ".ci", "run")) as f:
            ci = f.read()
        test_cmd = re.search(r"^bash tests/run$", ci, re.M)
        self.assertTrue(test_cmd, ".ci/run must call tests/run")
        self.assertIn("bash tests/run", readme)
        self.assertIn("python3 hookd.py 0.0.0.0:8000", readme)


if __name__ == "__main__":
    unittest.main()
