"""Python 3.9 compatibility: every product module compiles and imports under a real Python 3.9, and the
fast unit suites pass there too. Skipped (with the reason) only where no Python 3.9 can be found."""

import glob
import os
import shutil
import subprocess
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CANDIDATES = ("python3.9", "/root/.pyenv/versions/3.9.18/bin/python3.9", "/usr/bin/python3.9")


def python39():
    for name in CANDIDATES:
        path = shutil.which(name) or (name if os.path.isfile(name) else None)
        if not path:
            continue
        try:
            out = subprocess.run([path, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                                 text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == "(3, 9)":
            return path
    return None


PY39 = python39()


@unittest.skipIf(PY39 is None, "no Python 3.9 interpreter on this machine")
class Python39Test(unittest.TestCase):
    def run39(self, *args, timeout=300):
        return subprocess.run([PY39] + list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    def test_every_module_compiles_and_imports(self):
        modules = ["hookd_core." + os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "hookd_core", "*.py"))]
        modules += ["handlers." + os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "handlers", "*.py"))]
        code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\nprint('ok')"
        r = self.run39("-W", "error::SyntaxWarning", "-c", code, *sorted(modules))
        self.assertEqual(r.returncode, 0, r.stderr[-3000:])
        r = self.run39("-m", "py_compile", "hookd.py")
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_cli_and_unit_suites_run_on_39(self):
        r = self.run39("hookd.py", "--help")
        self.assertEqual(r.returncode, 0, r.stderr)
        r = self.run39("-W", "ignore::ResourceWarning", "-m", "unittest", "tests.test_store", "tests.test_worker",
                       "tests.test_verify", "tests.test_framing.FramingUnitTest")
        self.assertEqual(r.returncode, 0, r.stderr[-3000:])


if __name__ == "__main__":
    unittest.main()
