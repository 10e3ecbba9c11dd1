"""Parts of the hookd benchmark driver (bench/bench.py): request pools, processes, wrk runs, report."""
