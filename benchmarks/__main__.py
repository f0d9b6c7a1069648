"""`python -m benchmarks [--quick] [--json PATH]`: the speed and memory of every configuration,
each figure beside a baseline measured in the same run, as a table and as JSON rows
{"name", "value", "unit", "baseline", "baseline_value", "config"}.

--quick (a few minutes on 2 cores) uses fewer photos and runs, and leaves out the full-size
training steps; the full run takes about half an hour on 2 cores.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

import torch

from dfd_data.devices import thread_budget
from dfd_data.errors import UserError
from dfd_data.weights import hed_weights_path
from pipelines.demo import DEMO_MODEL

from . import suite
from .measure import Row, cpu_name, table

GROUPS = ("align", "sketch", "crop", "projection", "generate", "train")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer photos and runs; no full-size training")
    parser.add_argument("--json", metavar="PATH", help="also write the rows to this JSON file")
    parser.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS), help="run only these groups")
    args = parser.parse_args()
    args.only = list(dict.fromkeys(args.only))  # (a group named twice runs once)
    if args.json and (os.path.isdir(args.json) or not os.path.isdir(os.path.dirname(os.path.abspath(args.json)))):
        parser.error(f"--json {args.json}: not a file in an existing folder")  # found now, not after the run
    if "sketch" in args.only:
        try:
            hed_weights_path()
        except UserError as error:
            parser.error(f"the sketch group needs the HED weights: {error}")
    runs = 3 if args.quick else 5  # (an odd count: the median is one of the runs)
    torch.set_num_threads(thread_budget())  # what the toolkit's own calls use: every figure at one count
    started = time.time()
    print(f"{cpu_name()} ({os.cpu_count()} CPUs), torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"python {platform.python_version()}; {'quick' if args.quick else 'full'} run", flush=True)
    rows: list[Row] = []

    @functools.cache
    def rates() -> suite.Rates:  # measured once, by the first group that needs FLOP-bound times
        measured = suite.Rates()
        rows.extend(measured.rows())
        return measured

    @functools.cache
    def faces() -> list:
        return suite.aligned_faces(suite.BATCH if args.quick else 16)

    demo, full = {**DEMO_MODEL, "resolution": 128}, {}  # the demo's small model; the default 512 one
    groups = {
        "align": lambda: suite.alignment_rows(10 if args.quick else 60),
        "sketch": lambda: suite.sketch_rows(faces(), rates(), runs),
        "crop": lambda: suite.crop_rows(faces(), runs),
        "projection": lambda: suite.projection_rows(runs),
        "generate": lambda: suite.generation_rows({"demo_128": demo, "512": full}, rates(), runs),
        "train": lambda: suite.training_rows({"demo_128": (demo, 8), **({} if args.quick else {"512": (full, 1)})},
                                             rates(), runs),
    }
    for name in args.only:
        print(f"... {name}", file=sys.stderr, flush=True)
        rows += groups[name]()
    for row in rows:  # a row copied out of the file still says how it was measured
        row.config.update(quick=args.quick, threads=torch.get_num_threads())
    print(table(rows))
    print(f"{len(rows)} figures in {time.time() - started:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"machine": cpu_name(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "quick": args.quick, "runs": runs,
                       "rows": [row.as_dict() for row in rows]}, handle, indent=1)
        print(f"rows written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
