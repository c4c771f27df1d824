"""What every job entrypoint shares: the arguments, the config, Ray, MLflow, and a readable failure."""

from __future__ import annotations

import argparse
import os
import sys

from pipeline import runtime
from pipeline.config import RunConfig, load_config


def parse(description: str, argv: list[str] | None = None, extra=None) -> tuple[RunConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="a YAML run config, e.g. configs/tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, repeatable: --set loss.temperature=4")
    parser.add_argument("--verbose", action="store_true",
                        help="also show Ray's, DeepSpeed's and MLflow's own logs (the same as DISTIL_VERBOSE=1)")
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    if args.verbose:
        # One setting, one place: the driver reads it in start() and passes it to every Ray worker.
        os.environ[runtime.VERBOSE_ENV] = "1"
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    return cfg, args


def start(cfg: RunConfig, *, with_ray: bool = True, with_tracking: bool = True) -> float:
    """Connect to MLflow and Ray (unless told not to); returns the cluster's CPU count.

    What the run prints is set up first (pipeline/runtime.py): quiet libraries unless ``--verbose`` or
    ``DISTIL_VERBOSE=1``, a progress bar or lines.
    """
    from pipeline import preflight, tracking

    verbose = runtime.is_verbose()
    worker_env = runtime.configure_output(verbose=verbose)

    preflight.check(cfg, teacher=with_ray)  # before Ray or MLflow: the run folders, a pretrained teacher

    if with_tracking:
        tracking.setup(cfg.run.root, cfg.tracking.experiment)
    if not with_ray:
        return 0.0
    return float(runtime.init_ray(cfg.run, env=worker_env, verbose=verbose).get("CPU", 0))


def main_guard(fn) -> int:
    """Run a job; a ValueError (bad input caught at the edge) prints one clear line, not a stack trace."""
    try:
        fn()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
