"""One `ssapo bench` run, start to finish, in a process of its own: where a run's seconds go is
measured from outside it (`/usr/bin/time -v python benches/bench_one_run.py OUT ssapo new`).

    python benches/bench_one_run.py OUT METHOD TAG

Runs `METHOD` of the default preset on seed 0, clean labels, into OUT/seed0/seedflip0_annflip0/METHOD_TAG
(removed first, so every call trains and evaluates again), reusing OUT's seed-0 task and π_0 (built by the
first call), and prints the run's seconds and final win rate. Two checkouts side by side:
`PYTHONPATH=<other checkout>/python python benches/bench_one_run.py OUT ssapo old`, alternating.
"""

import shutil
import sys
import time

from ssapo.bench import suite


def main(out: str, method: str, tag: str) -> None:
    job = suite.Job(0, 0.0, 0.0, method)
    plain = suite.Job.dir
    # this method's directory gets the tag; π_0's (the dpo run's) stays where every tag finds it
    suite.Job.dir = lambda self, o: plain(self, o) + "_" + tag if self.method == method else plain(self, o)
    shutil.rmtree(job.dir(out), ignore_errors=True)
    t = time.time()
    ev = suite.run_one(suite.PRESETS["default"], job, out)
    if "failed" in ev:
        raise SystemExit(f"bench_one_run: {ev['failed']['cause']}")
    print(tag, "seconds", round(time.time() - t, 1), "win rate", ev["rounds"][-1]["win_rate"])


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit("usage: python benches/bench_one_run.py OUT METHOD TAG")
    main(*sys.argv[1:])
