"""`simdist run | cache` — exit 0 simulated (fits or not), 2 bad input, 1 internal error."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own exit code is 2 as well; keep it short
        self.print_usage(sys.stderr)
        print(f"simdist: error: {message}", file=sys.stderr)
        sys.exit(EXIT_INPUT)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="simdist", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="simulate one plan")
    run.add_argument("config", help="YAML config (see configs/)")
    run.add_argument("--out", help="run directory (default runs/<config stem>/)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. parallel.tp=8 (repeatable)")
    run.add_argument("--address", help="join this Ray cluster (default: RAY_ADDRESS or a local Ray)")
    run.add_argument("--workers", type=int, help="number of simulation actors (default: auto)")
    run.add_argument("--no-cache", action="store_true", help="do not read or write the shared cache")
    run.add_argument("--exhaustive", action="store_true",
                     help="simulate every rank instead of one per class")
    run.add_argument("--quiet", action="store_true", help="no progress, no summary")
    cache = sub.add_parser("cache", help="the shared dispatch cache: info | clear | path")
    cache.add_argument("action", choices=["info", "clear", "path"])
    cache.add_argument("--cache-dir", help="default: simulation.cache_dir's default, "
                                           "~/.cache/simdist (or SIMDIST_CACHE_DIR)")
    cal = sub.add_parser("calibrate", help="measure this machine's GPU(s): write a calibration table")
    cal.add_argument("--out", help="the table (default calibration-<gpu>.parquet; sidecar <stem>.json)")
    cal.add_argument("--gpu", help="the GPU preset to write rows for (default: detected)")
    cal.add_argument("--quick", action="store_true", help="fewer shapes and sizes (under a minute)")
    return p


def _summary_line(plan) -> str:  # noqa: ANN001
    s = plan.summary
    gib = 2**30
    return (f"world {s['world_size']}  classes {s['rank_classes']}  "
            f"peak {s['peak_bytes_max'] / gib:.2f} GiB (rank {s['peak_rank']})  "
            f"fits {str(s['fits']).lower()}  step {s['step_time_s']:.3f} s  "
            f"MFU {100 * s['mfu']:.1f}%  {s['tokens_per_s_per_gpu']:.0f} tok/s/GPU  "
            f"sim {s['sim_wall_s']:.1f} s")


def cmd_run(args: argparse.Namespace) -> int:
    from simdist.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        from simdist.planner import plan_run

        # every input check before any Ray or file work
        run = plan_run(cfg, use_cache=not args.no_cache, exhaustive=args.exhaustive)
    except ConfigError as e:
        print(f"simdist: invalid input: {e}", file=sys.stderr)
        return EXIT_INPUT
    from simdist.coordinator import simulate

    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    plan = simulate(run, address=args.address, workers=args.workers, progress=not args.quiet,
                    use_cache=not args.no_cache)
    path = plan.write(out)
    if not args.quiet:
        print(_summary_line(plan))
        print(f"wrote {path}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "cache":
            from simdist.cache.commands import cache_command

            return cache_command(args.action, args.cache_dir)
        if args.command == "calibrate":
            from simdist.calibrate import calibrate_command

            return calibrate_command(args.out, args.gpu, args.quick)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # an internal error: short message, traceback only on request
        if "SIMDIST_DEBUG" in __import__("os").environ:
            raise
        print(f"simdist: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_INTERNAL
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
