"""`simdist run | sweep | search | fit | compare | report | cache | calibrate` — exit 0 simulated (fits or not), 2 bad input, 1 internal error;
130 / 143 stopped by SIGINT / SIGTERM (nothing written)."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from pathlib import Path

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own exit code is 2 as well; keep it short
        self.print_usage(sys.stderr)
        print(f"simdist: error: {message}", file=sys.stderr)
        sys.exit(EXIT_INPUT)


def versions() -> str:
    """'simdist X, torch Y' without importing torch (its distribution's metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    import simdist

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    return f"simdist {simdist.__version__}, torch {torch_version}"


class _Version(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001, ANN204
        print(versions())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="simdist", description=__doc__)
    p.add_argument("--version", action=_Version, nargs=0, help="print simdist's and torch's versions")
    debug = dict(action="store_true", help="on an internal error print the traceback too "
                                            "(also: SIMDIST_DEBUG=1)")
    p.add_argument("--debug", **debug)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="simulate one plan")
    run.add_argument("config", help="YAML config (see configs/)")
    run.add_argument("--out", help="run directory (default runs/<config stem>/); replaces only a "
                                   "previous simdist run directory")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. parallel.tp=8 (repeatable)")
    run.add_argument("--address", help="join this Ray cluster (default: RAY_ADDRESS or a local Ray)")
    run.add_argument("--workers", metavar="N", help="number of simulation actors: auto or an "
                                                    "integer >= 1 (default: simulation.workers)")
    run.add_argument("--no-cache", action="store_true", help="do not read or write the shared cache")
    run.add_argument("--exhaustive", action="store_true",
                     help="simulate every rank instead of one per class")
    run.add_argument("--trust-code", action="store_true",
                     help="allow model.entrypoint: it imports and runs the code the config names")
    run.add_argument("--quiet", action="store_true", help="no progress, no summary")
    sweep = sub.add_parser("sweep", help="simulate every combination of a grid of config values, "
                                         "ranked (DIR/sweep.parquet)")
    sweep.add_argument("config", help="YAML config (see configs/)")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                       help="values of one config key, parsed like --set (repeatable: every "
                            "combination is a plan)")
    search = sub.add_parser("search", help="the plan space for the model on the cluster: "
                                           "enumerated, pruned, simulated best-first, ranked")
    search.add_argument("config", help="YAML config (see configs/)")
    search.add_argument("--gpus", type=int, nargs="+", action="extend", metavar="N",
                        help="GPU counts to search (default: the config's nodes x gpus_per_node)")
    search.add_argument("--objective", choices=["tokens_per_s", "cost", "peak"],
                        default="tokens_per_s", help="what 'best' means (default tokens_per_s)")
    search.add_argument("--top", type=int, default=5, metavar="K",
                        help="plans in search.json's best list (default 5)")
    search.add_argument("--max-plans", type=int, default=16, metavar="M",
                        help="simulate at most this many plans (default 16)")
    search.add_argument("--prior-plans", type=int, metavar="P",
                        help="of those, the first P in the analytical prior's order; the rest "
                             "are neighbours of the best simulated so far (default: half of "
                             "--max-plans, rounded up)")
    for sp in (sweep, search):
        sp.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key for every plan "
                                                  "(repeatable)")
        sp.add_argument("--out", help="output directory (default sweeps/<config stem>/ or "
                                      "searches/<config stem>/); replaces only a previous simdist "
                                      "output directory")
        sp.add_argument("--address", help="join this Ray cluster (default: RAY_ADDRESS or a "
                                          "local Ray)")
        sp.add_argument("--workers", metavar="N", help="rank actors per plan: auto or an integer "
                                                       ">= 1 (default: simulation.workers)")
        sp.add_argument("--concurrency", type=int, default=1, metavar="N",
                        help="plans simulated at once (default 1); each starts its own actors")
        sp.add_argument("--no-cache", action="store_true",
                        help="do not read or write the shared cache")
        sp.add_argument("--trust-code", action="store_true",
                        help="allow model.entrypoint: it imports and runs the code the config names")
        sp.add_argument("--quiet", action="store_true", help="no progress, no table")
    fit = sub.add_parser("fit", help="the largest micro-batch or sequence length that fits, from a "
                                     "symbolic run (DIR/fit.json)")
    fit.add_argument("config", help="YAML config (see configs/)")
    fit.add_argument("--solve", required=True, metavar="KEY",
                     help="the dimension to solve for: training.micro_batch or training.seq_len")
    fit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key (repeatable)")
    fit.add_argument("--out", help="output directory (default runs/<config stem>-fit/); "
                                   "replaces only a previous simdist output directory")
    fit.add_argument("--address", help="join this Ray cluster (default: RAY_ADDRESS or a local Ray)")
    fit.add_argument("--workers", metavar="N", help="simulation actors: auto or an integer >= 1 "
                                                    "(default: simulation.workers)")
    fit.add_argument("--no-cache", action="store_true",
                     help="do not read or write the shared cache (concrete runs)")
    fit.add_argument("--trust-code", action="store_true",
                     help="allow model.entrypoint: it imports and runs the code the config names")
    fit.add_argument("--quiet", action="store_true", help="no progress, no summary")
    compare = sub.add_parser("compare", help="plans side by side from their run directories")
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR",
                         help="two or more run directories (plan.json, ranks.parquet, "
                              "collectives.parquet)")
    compare.add_argument("--html", metavar="PATH", help="also write a self-contained HTML report "
                                                        "(charts and the tables)")
    report = sub.add_parser("report", help="(re)build DIR/report.html from a run, sweep or "
                                           "search directory alone")
    report.add_argument("dir", metavar="DIR", help="a directory written by simdist run, sweep or "
                                                   "search (or a sweep's plans/<n>)")
    cache = sub.add_parser("cache", help="the shared cache (dispatch cache, layer and plan stores): "
                                         "info | clear | path")
    cache.add_argument("action", choices=["info", "clear", "path"])
    cache.add_argument("--cache-dir", help="default: simulation.cache_dir's default, "
                                           "~/.cache/simdist (or SIMDIST_CACHE_DIR)")
    for sp in (run, sweep, search, fit, compare, report, cache):  # `simdist run ... --debug` as well as `simdist --debug run ...`
        sp.add_argument("--debug", **debug, default=argparse.SUPPRESS)
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
    """Every input check (config, --workers, --out, the plan against the model, the Ray address)
    before anything is simulated or written."""
    from simdist.config import check_workers, load_config
    from simdist.rundir import check_out

    cfg = load_config(args.config, args.overrides, trust_code=args.trust_code)
    workers = check_workers(args.workers, "--workers") if args.workers is not None else None
    out = check_out(args.out if args.out else Path("runs") / Path(args.config).stem)
    from simdist.planner import plan_run

    if not args.quiet:
        print("simdist: planning", file=sys.stderr, flush=True)
    run = plan_run(cfg, use_cache=not args.no_cache, exhaustive=args.exhaustive)
    if not args.quiet:
        print(f"simdist: planned {run.layout.world_size} GPU(s) as {len(run.classes)} rank "
              f"class(es), model {run.spec.family}", file=sys.stderr, flush=True)
    from simdist.coordinator import simulate
    from simdist.workers.connect import native_stderr_kept_apart

    with native_stderr_kept_apart(enabled=not getattr(args, "debug_all", False)):
        plan = simulate(run, address=args.address, workers=workers, progress=not args.quiet,
                        use_cache=not args.no_cache)
    path = plan.write(out)
    if not args.quiet:
        print(_summary_line(plan))
        print(f"wrote {path}")
    return EXIT_OK


def _plan_options(args: argparse.Namespace) -> tuple:
    """Checks shared by sweep and search, before anything is planned or simulated."""
    from simdist.config import ConfigError, check_workers

    workers = check_workers(args.workers, "--workers") if args.workers is not None else None
    if args.concurrency < 1:
        raise ConfigError("--concurrency", f"got {args.concurrency}; expected an integer >= 1")
    return workers


def cmd_sweep(args: argparse.Namespace) -> int:
    from simdist.rundir import check_out
    from simdist.sweep import parse_grid

    workers = _plan_options(args)
    parse_grid(args.grid)  # a malformed grid fails before anything is loaded
    out = check_out(args.out if args.out else Path("sweeps") / Path(args.config).stem)
    from simdist.sweep import print_ranked, run_sweep

    res = run_sweep(args.config, args.grid, args.overrides, out, address=args.address,
                    workers=workers, use_cache=not args.no_cache, trust_code=args.trust_code,
                    concurrency=args.concurrency, progress=not args.quiet)
    if not args.quiet:
        print_ranked(res.rows, res.keys, title=f"simdist sweep: {len(res.rows)} plans, "
                                                "best tokens/s first")
        print(f"wrote {res.out}")
    return EXIT_INTERNAL if any(r["status"] == "failed" for r in res.rows) else EXIT_OK


def cmd_search(args: argparse.Namespace) -> int:
    from simdist.config import ConfigError
    from simdist.rundir import check_out

    workers = _plan_options(args)
    for name, value, lo in (("--top", args.top, 1), ("--max-plans", args.max_plans, 0),
                            ("--prior-plans", args.prior_plans, 0)):
        if value is not None and value < lo:
            raise ConfigError(name, f"got {value}; expected an integer >= {lo}")
    if args.gpus and min(args.gpus) < 1:
        raise ConfigError("--gpus", f"got {min(args.gpus)}; expected integers >= 1")
    out = check_out(args.out if args.out else Path("searches") / Path(args.config).stem)
    from simdist.search import print_search, run_search

    res = run_search(args.config, args.overrides, out, gpus=args.gpus, objective=args.objective,
                     top=args.top, max_plans=args.max_plans, address=args.address,
                     workers=workers, use_cache=not args.no_cache, trust_code=args.trust_code,
                     concurrency=args.concurrency, progress=not args.quiet,
                     prior_plans=args.prior_plans)
    if not args.quiet:
        print_search(res)
        print(f"wrote {res.out}")
    return EXIT_INTERNAL if any(r["status"] == "failed" for r in res.rows) else EXIT_OK


def cmd_fit(args: argparse.Namespace) -> int:
    """Every input check (--solve, the config, --workers, --out) before anything runs."""
    from simdist.config import check_workers
    from simdist.rundir import check_out
    from simdist.solve import check_key

    check_key(args.solve)
    workers = check_workers(args.workers, "--workers") if args.workers is not None else None
    out = check_out(args.out if args.out else Path("runs") / f"{Path(args.config).stem}-fit")
    from simdist.solve import run_fit, summary_lines
    from simdist.workers.connect import native_stderr_kept_apart

    with native_stderr_kept_apart(enabled=not getattr(args, "debug_all", False)):
        res = run_fit(args.config, args.solve, args.overrides, out, address=args.address,
                      workers=workers, use_cache=not args.no_cache, trust_code=args.trust_code,
                      progress=not args.quiet)
    if not args.quiet:
        print("\n".join(summary_lines(res.data)))
        print(f"wrote {res.out}")
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from simdist.compare import compare_command

    return compare_command(args.runs, args.html)


def _show_warning(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001, ANN202
    """Warnings of simdist's cache and report as one plain line; every other warning as Python
    shows it."""
    if category.__name__ not in ("CacheWarning", "ReportWarning"):
        return _default_showwarning(message, category, filename, lineno, file, line)
    text = " ".join(str(message).split())
    print(text if text.startswith("simdist") else f"simdist: warning: {text}",
          file=file or sys.stderr)
    return None


_default_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    from simdist.signals import sigterm_as_interrupt

    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False)) or "SIMDIST_DEBUG" in os.environ
    args.debug_all = debug
    with sigterm_as_interrupt() as stop, warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            if args.command == "run":
                return cmd_run(args)
            if args.command == "sweep":
                return cmd_sweep(args)
            if args.command == "search":
                return cmd_search(args)
            if args.command == "fit":
                return cmd_fit(args)
            if args.command == "compare":
                return cmd_compare(args)
            if args.command == "report":
                from simdist.report import report_command

                return report_command(args.dir)
            if args.command == "cache":
                from simdist.cache.commands import cache_command

                return cache_command(args.action, args.cache_dir)
            if args.command == "calibrate":
                from simdist.calibrate import calibrate_command

                return calibrate_command(args.out, args.gpu, args.quick)
        except KeyboardInterrupt:
            name = stop.signal_name or "SIGINT"
            print(f"simdist: stopped by {name}; nothing written", file=sys.stderr)
            return stop.exit_code
        except Exception as e:  # noqa: BLE001
            return _report(e, debug)
    return EXIT_OK


def _report(e: Exception, debug: bool) -> int:
    """Bad input (ConfigError, also when raised inside a Ray actor): exit 2; anything else is an
    internal error: exit 1. One plain line either way; --debug adds the traceback."""
    from simdist.config import ConfigError
    from simdist.errors import CannotSimulate, RayClusterLost, one_line, plain, root_cause

    cause, _ = root_cause(e)
    if debug:
        print(plain("".join(traceback.format_exception(e))).rstrip(), file=sys.stderr)
    if isinstance(cause, ConfigError):
        print(f"simdist: invalid input: {ConfigError(cause.key, cause.message)}", file=sys.stderr)
        return EXIT_INPUT
    hint = "" if debug else " (--debug prints the traceback)"
    if isinstance(cause, CannotSimulate):  # the model's, not simdist's: one line, what to do
        print(f"simdist: cannot simulate the model: {plain(str(cause))}", file=sys.stderr)
        return EXIT_INTERNAL
    if isinstance(cause, RayClusterLost):
        print(f"simdist: Ray failed: {cause}", file=sys.stderr)
        return EXIT_INTERNAL
    print(f"simdist: internal error: {one_line(e)}{hint}", file=sys.stderr)
    return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
