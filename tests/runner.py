"""Run every tests/test_*.py with unittest, one module at a time, and print a count line at the end.

Each module runs in its own ``python3 -m unittest`` process, so a crash or a stray thread in one module
cannot take the others down, and the time per module is printed. Each gets a temporary directory of its
own as TMPDIR (for it and every daemon it starts), removed when the module ends: the tests make their
scratch directories with ``tempfile`` and a daemon's state lives there, so a suite run leaves nothing
behind in /tmp. The last line is ``N passed, N failed, N skipped`` (what CI reads); the exit code is 0
only when nothing failed.
Usage: python3 tests/runner.py [test_module_name ...]
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAN = re.compile(r"^Ran (\d+) tests? in", re.M)
TAIL = re.compile(r"^(OK|FAILED)(?: \((.*)\))?\s*$", re.M)
MODULE_TIMEOUT = 900  # seconds; a module that hangs is killed and counted as failed


def counts(output):
    """(ran, failed, skipped) from unittest's closing lines."""
    ran = sum(int(n) for n in RAN.findall(output))
    failed = skipped = 0
    for _, detail in TAIL.findall(output):
        for part in (detail or "").split(","):
            name, _, num = part.strip().partition("=")
            if name in ("failures", "errors", "unexpected successes"):
                failed += int(num)
            elif name == "skipped":
                skipped += int(num)
    return ran, failed, skipped


def run_module(name):
    started = time.monotonic()
    scratch = tempfile.mkdtemp(prefix="hookd-suite-")
    try:
        proc = subprocess.run([sys.executable, "-W", "ignore::ResourceWarning", "-m", "unittest", "-v",
                               "tests." + name], cwd=ROOT, capture_output=True, text=True,
                              timeout=MODULE_TIMEOUT, env=dict(os.environ, TMPDIR=scratch))
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        output, code = (e.stdout or b"").decode(errors="replace") + "\nTIMEOUT\n", -1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ran, failed, skipped = counts(output)
    if code != 0 and failed == 0:
        failed = max(1, ran)  # the module crashed or hung: count it as failed, never as passed
        ran = max(ran, failed)
    return ran, failed, skipped, time.monotonic() - started, output, code


def main(argv):
    names = argv or sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py")))
    total = [0, 0, 0]
    for name in names:
        ran, failed, skipped, secs, output, code = run_module(name)
        status = "ok" if code == 0 else "FAILED"
        print("%-24s %4d tests  %3d failed  %3d skipped  %6.1fs  %s" % (name, ran, failed, skipped, secs, status),
              flush=True)
        if code != 0:
            print(output[-8000:], flush=True)
        total[0] += ran
        total[1] += failed
        total[2] += skipped
    passed = total[0] - total[1] - total[2]
    print("%d passed, %d failed, %d skipped" % (passed, total[1], total[2]))
    return 1 if total[1] or total[0] == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
