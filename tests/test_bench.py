"""The benchmark takes the runs a ratio divides in the same minutes: within one workload and one connection
count, run 1 of every target (the ceiling first), then run 2 of every target, and so on, so that no target's
runs at a point sit in a block of their own, minutes away from the ceiling's they are divided by."""

import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from benchlib import measure  # noqa: E402


class RunOrderTest(unittest.TestCase):
    def test_runs_alternate_between_targets_within_each_connection_count(self):
        order = measure.run_order(["ceiling", "naive-durable", "hookd"], [1, 16], 3)
        expected = []
        for conns in (1, 16):
            for run in range(3):
                expected += [(conns, run, "ceiling"), (conns, run, "naive-durable"), (conns, run, "hookd")]
        self.assertEqual(order, expected)

    def test_every_target_runs_between_two_runs_of_another(self):
        names = ["ceiling", "naive-durable", "hookd", "flask-dev"]
        order = measure.run_order(names, [16], 3)
        for name in names:
            at = [i for i, (_, _, t) in enumerate(order) if t == name]
            self.assertEqual(len(at), 3)
            for first, second in zip(at, at[1:]):
                between = {t for _, _, t in order[first + 1:second]}
                self.assertEqual(between, set(names) - {name}, "between two runs of %s" % name)


if __name__ == "__main__":
    unittest.main()
