"""The `lab` command line. Each subcommand imports what it needs when it runs, so that
`lab --help` answers without importing torch.

Errors a user can fix (bad config value, unknown key, missing file, bad run name) print one line,
`lab: error: ...`, and exit with code 2; Ctrl-C exits with 130 after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_DIVERGED = 1  # the run stopped on a non-finite loss (summary status "diverged")
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """Raised by commands for a problem the user can fix; printed as one line, exit code 2."""


def _add_runs_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs-dir", metavar="DIR", help="runs folder (default: $LAB_RUNS_DIR or ./runs)")


# --- lab train -------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from lab.config import load_experiment
    from lab.runs.storage import default_runs_dir, new_run_dir
    from lab.training.trainer import Trainer, resolve_device

    progress = not args.quiet
    if args.resume is not None:
        if args.experiment or args.name is not None:
            raise UserError("--resume RUN_DIR continues a run with its own config; drop EXPERIMENT and --name "
                            "(--set train.steps=N extends it)")
        trainer = Trainer.resume(args.resume, progress=progress, overrides=args.overrides or [])
        summary = trainer.run(resume=True)
    else:
        if not args.experiment:
            raise UserError("lab train needs an EXPERIMENT (a TOML path or a name in experiments/), or --resume RUN_DIR")
        config = load_experiment(args.experiment, args.overrides).resolve()
        resolve_device(config.train.device)  # e.g. cuda without a GPU: one line, before a run folder is named
        named = args.name is not None  # --name '' is refused by new_run_dir, not silently replaced
        run_dir = new_run_dir(args.runs_dir or default_runs_dir(), args.name if named else config.name, exact=named)
        print(f"run folder: {run_dir}", file=sys.stderr)
        try:
            trainer = Trainer(config, run_dir, progress=progress)
        except BaseException:
            if not any(run_dir.iterdir()):
                run_dir.rmdir()  # nothing was written: leave no empty run behind
            raise
        summary = trainer.run()
    _print_summary(summary, trainer.run_dir)
    args.run_dir = trainer.run_dir  # for `lab demo`, which analyses what it trained
    return {"interrupted": EXIT_INTERRUPTED, "diverged": EXIT_DIVERGED}.get(summary["status"], 0)


def _print_summary(summary: dict, run_dir) -> None:
    from lab.runs.outcomes import reached_text

    final = {k: v if v is not None else float("nan") for k, v in summary.get("final", {}).items()}
    print(
        f"{summary['status']}: {run_dir} at step {summary['step']}/{summary['steps']}, "
        f"train acc {final.get('train_acc', float('nan')):.4f}, test acc {final.get('test_acc', float('nan')):.4f}, "
        f"{reached_text('memorized', summary['memorize_step'], summary['step'])}, "
        f"{reached_text('grokked', summary['grok_step'], summary['step'])}, {summary['wall_time_s']:.1f} s"
    )
    if summary["status"] == "interrupted":
        print(f"resume with: lab train --resume {run_dir}", file=sys.stderr)
    if summary["status"] == "diverged":
        print(f"lab: diverged: {summary.get('hint')}", file=sys.stderr)


# --- lab sweep -------------------------------------------------------------------------------------


def cmd_sweep(args: argparse.Namespace) -> int:
    """Train (or continue) every member of a sweep: see `lab.sweeps.sweep`."""
    from lab.sweeps.sweep import SweepSpec, run_sweep

    spec = SweepSpec.build(args.experiment, grid=args.grid, seeds=args.seeds, overrides=args.overrides, name=args.name)
    result = run_sweep(spec, runs_dir=args.runs_dir, backend=args.backend, address=args.address, progress=not args.quiet)
    counts = ", ".join(f"{n} {status}" for status, n in sorted(result["counts"].items()))
    print(f"{result['status']}: {result['sweep_dir']}: {result['members']} members ({counts}); "
          f"trained {result['trained']}, skipped {result['skipped']} already finished")
    if result["status"] == "interrupted":
        print("continue it: run the same command again (same --grid, --seeds, --set and --name)", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def cmd_sweeps(args: argparse.Namespace) -> int:
    import json

    from lab.runs.storage import default_runs_dir
    from lab.sweeps.sweep import list_sweeps

    rows = list_sweeps(args.runs_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no sweeps in {args.runs_dir or default_runs_dir()}; start one with: "
              "lab sweep modadd_quick --grid train.weight_decay=0.3,1,3 --seeds 2")
        return 0
    columns = ["name", "experiment", "axes", "members", "progress", "phases"]
    table = []
    for row in rows:
        axes = " x ".join(f"{key.rsplit('.', 1)[-1]}({len(values)})" for key, values in row["axes"].items())
        if row.get("seeds"):
            axes = f"{axes} x seeds({row['seeds']})" if axes else f"seeds({row['seeds']})"
        progress = ", ".join(f"{n} {status}" for status, n in sorted(row["statuses"].items())) or row["status"]
        phases = ", ".join(f"{n} {phase}" for phase, n in row["phases"].items()) or "-"
        table.append([row["name"], str(row["experiment"] or "-"), axes or "-", str(row["members"]), progress, phases])
    widths = [max(len(col), *(len(r[i]) for r in table)) for i, col in enumerate(columns)]
    print("  ".join(col.ljust(w) for col, w in zip(columns, widths)).rstrip())
    for r in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    from lab.sweeps.stats import phase_thresholds_text

    print(f"phases (Liu et al. 2022, Table 1): {phase_thresholds_text()}")
    for row in rows:  # a damaged sweep.json: its row says "damaged", this line says what (its members stay in `lab runs`)
        if row.get("error"):
            print(f"lab: {row['name']}: {row['error']}", file=sys.stderr)
    return 0


# --- lab runs --------------------------------------------------------------------------------------


def cmd_runs(args: argparse.Namespace) -> int:
    import json

    from lab.runs.run import list_runs
    from lab.runs.storage import default_runs_dir

    folder = Path(args.runs_dir or default_runs_dir())
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--runs-dir {folder} is a file, not a folder of runs")
    rows = list_runs(args.runs_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no runs in {args.runs_dir or default_runs_dir()}; start one with: lab train modadd_quick")
        return 0
    # test_loss: what a language model's run is read by (its memorise and grok steps rarely apply)
    columns = ["name", "task", "arch", "params", "status", "step", "memorize_step", "grok_step", "test_acc", "test_loss"]
    table = [[_cell(row, col) for col in columns] for row in rows]
    widths = [max(len(col), *(len(r[i]) for r in table)) for i, col in enumerate(columns)]
    print("  ".join(col.ljust(w) for col, w in zip(columns, widths)))
    for r in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)))
    return 0


def _cell(row: dict, col: str) -> str:
    value = row.get(col)
    if col == "params":  # parameter count, from summary.json
        value = row.get("n_params")
    if col == "step" and row.get("steps") is not None:
        return f"{value}/{row['steps']}"
    if col in ("memorize_step", "grok_step") and value is None and row.get("step") is not None:
        return f">{row['step']}"  # not reached within the steps run so far: censored, not a step
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


# --- lab demo --------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """Train the quick experiments, analyse what the dashboard's pages show, then open the dashboard on them."""
    import os

    import torch

    from lab.analysis.circuit_history import precompute_circuits
    from lab.analysis.heads import precompute_heads
    from lab.analysis.progress import progress_measures
    from lab.runs.run import load_run

    # One torch thread unless the user chose (OMP_NUM_THREADS): these models are small, and on a busy
    # machine a second thread spin-waits for a core. Measured from start to a healthy dashboard on a
    # shared 2-core machine under load: 62 s of CPU and 121 s wall with one thread (load average 5-11),
    # 341 s of CPU and 971 s wall with two (load average 13).
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    for experiment in ("modadd_quick", "a_and_b"):
        train_args = argparse.Namespace(experiment=experiment, overrides=[], name=None, runs_dir=args.runs_dir,
                                        resume=None, quiet=False)
        code = cmd_train(train_args)
        if code:
            return code
        # The Progress measures, Heads and Circuits pages then answer from the run folder's cache, not by computing.
        run = load_run(train_args.run_dir)
        if run.task.name == "modular":
            progress_measures(run, progress=True)
        precompute_heads(run, progress=True)
        precompute_circuits(run, progress=True)
    if args.no_dashboard:
        print(f"done; browse the runs with: lab dashboard{' --runs-dir ' + args.runs_dir if args.runs_dir else ''}")
        return 0
    return cmd_dashboard(argparse.Namespace(runs_dir=args.runs_dir, port=args.port, host="127.0.0.1", headless=False))


# --- lab dashboard ---------------------------------------------------------------------------------


def cmd_dashboard(args: argparse.Namespace) -> int:
    from lab.dashboard_server import DashboardError, serve

    try:
        return serve(runs_dir=args.runs_dir, port=args.port, host=args.host, headless=args.headless)
    except DashboardError as err:  # port taken, app missing: one line, exit 2
        raise UserError(str(err)) from None


# --- lab bench -------------------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    if args.max_steps is not None and args.max_steps < 1:
        raise UserError(f"--max-steps must be at least 1, got {args.max_steps}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available on this machine; use --device cpu")
    from lab.bench.suite import main as bench_main

    return bench_main(quick=args.quick, device=args.device, max_steps=args.max_steps, json_path=args.json, rounds=args.rounds)


# --- lab analyze -----------------------------------------------------------------------------------


def cmd_analyze(args: argparse.Namespace) -> int:
    """Nanda et al.'s progress measures at every checkpoint of a modular run (a next-token run: the induction
    measures), stored in RUN/analysis/."""
    from lab.analysis.progress import cache_file, progress_measures
    from lab.runs.run import load_run

    run = load_run(args.run, args.runs_dir)
    if run.task.read_position is None:  # a next-token run: the induction measures instead
        return analyze_induction(run, quiet=args.quiet)
    frame = progress_measures(run, progress=not args.quiet, definition=args.definition)
    freqs = frame.attrs["key_frequencies"]
    print(f"{run.name}: {len(frame)} checkpoints; key frequencies: {', '.join(map(str, freqs)) or 'none found'}")
    print(f"definition {frame.attrs['definition']}")
    columns = ["step", "train_loss", "test_loss", "restricted_loss", "excluded_loss", "gini_embed", "sum_sq_weights"]
    print(_evenly_spaced_rows(frame)[columns].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print(f"stored in {run.path / cache_file(args.definition)}")
    return 0


def analyze_induction(run, quiet: bool = False) -> int:
    """`lab analyze` of a next-token run: the induction measures at every checkpoint, stored in RUN/analysis/."""
    from lab.analysis.ablation import CACHE_DIR
    from lab.analysis.induction import induction_history

    history = induction_history(run, progress=not quiet)
    print(history.summary())
    columns = [c for c in ("step", "test_loss", "repeated_loss", "induction_loss", "icl_score", "top_previous_token",
                           "top_induction") if history.measures[c].notna().any()]
    print(_evenly_spaced_rows(history.measures)[columns].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print(f"stored in {run.path / CACHE_DIR}")
    return 0


def _evenly_spaced_rows(frame, rows: int = 12):
    """At most `rows` rows of a per-checkpoint frame, evenly spaced, the first and last included."""
    return frame if len(frame) <= rows else frame.iloc[[round(i * (len(frame) - 1) / (rows - 1)) for i in range(rows)]]


# --- parser ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lab",
        description="grokking-lab: train small transformers on toy tasks, watch them grok, open them up head by head.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train an experiment into a run folder", description="Train an experiment into runs/NAME.")
    p.add_argument("experiment", nargs="?", help="a TOML path, or a name in experiments/ (e.g. modadd_quick)")
    p.add_argument("--name", help="run name (default: the experiment's name, numbered if taken)")
    _add_runs_dir(p)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.steps=500 --set task.p=97")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint (--set train.steps=N extends it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("sweep", help="train a grid of runs (axes x seeds) as one sweep, vectorised",
                       description="Train every point of the experiment's [sweep] table and the --grid axes, times "
                                   "--seeds model seeds, into runs/NAME/ (sweep.json and one run folder per member). "
                                   "Same-shape members train together as one stacked ensemble. Rerunning the same "
                                   "command continues the sweep; Ctrl-C checkpoints every member.")
    p.add_argument("experiment", help="a TOML path, or a name in experiments/")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="an axis (adds to or replaces the [sweep] table's), e.g. --grid train.weight_decay=0.3,1,3")
    p.add_argument("--seeds", type=int, metavar="N", help="repeat every point with model.seed = 0..N-1 (replaces [sweep] seeds)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="fixed overrides")
    p.add_argument("--name", help="sweep folder name (default: EXPERIMENT-sweep)")
    _add_runs_dir(p)
    p.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local: this process (default); ray: Ray tasks (pip install -e '.[ray]')")
    p.add_argument("--address", metavar="ADDR", help="with --backend ray: an existing cluster, 'auto' or HOST:PORT "
                                                      "(default: start a Ray instance on this machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_sweep)

    p = sub.add_parser("sweeps", help="list sweeps with their progress",
                       description="List the sweeps in the runs folder: axes, members per status, phases.")
    _add_runs_dir(p)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(handler=cmd_sweeps)

    p = sub.add_parser("runs", help="list runs", description="List the runs in the runs folder, newest first.")
    _add_runs_dir(p)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(handler=cmd_runs)

    p = sub.add_parser("analyze", help="compute progress measures (modular runs) or induction measures (next-token runs)",
                       description="Compute Nanda et al. 2023's progress measures (key frequencies, restricted and "
                                   "excluded loss, Gini of Fourier norms, sum of squared weights) at every checkpoint "
                                   "of a modular run, or, for a next-token run, Olsson et al. 2022's induction measures "
                                   "(loss by position, in-context-learning score, previous-token/duplicate-token/induction "
                                   "head scores), and store them in RUN/analysis/.")
    p.add_argument("run", help="a run folder, or a run name under the runs folder")
    _add_runs_dir(p)
    p.add_argument("--definition", choices=["paper", "tl_demo"], default="paper",
                   help="paper (default): Nanda et al.'s notebook, the logits' key-frequency terms, restricted loss on "
                        "all pairs; tl_demo: TransformerLens's demo, the neurons' terms through W_L, restricted loss on "
                        "the test split")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_analyze)

    p = sub.add_parser("demo", help="train the quick experiments and open the dashboard",
                       description="Train modadd_quick and a_and_b, then open the dashboard on them.")
    _add_runs_dir(p)
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--no-dashboard", action="store_true", help="only train")
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser("dashboard", help="open the Streamlit dashboard", description="Serve the dashboard on 127.0.0.1.")
    _add_runs_dir(p)
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--headless", action="store_true", help=argparse.SUPPRESS)  # always headless now; kept for old scripts
    p.set_defaults(handler=cmd_dashboard)

    from lab.bench import FULL_MAX_STEPS, QUICK_MAX_STEPS

    p = sub.add_parser("bench", help="measure training speed, steps to grok per recipe, and memory",
                       description="Time our training step against a TransformerLens baseline on the Nanda et al. 2023 "
                                   "setup, and the text experiment's full-sequence step against PyTorch's TransformerEncoder "
                                   "and TransformerLens; measure steps and seconds to grok for every recipe, peak memory "
                                   "and the speed-up of stacked sweeps.")
    p.add_argument("--quick", action="store_true", help=f"only the short cases (modadd_quick, grok runs capped at {QUICK_MAX_STEPS} "
                                                         "steps), fewer timing rounds: about 3 minutes")
    p.add_argument("--json", metavar="PATH", nargs="?", const="-",
                   help="also write the figures as JSON to PATH; without PATH, print the JSON on standard output "
                        "(and the table on standard error)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run (default cpu)")
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help=f"cap on the steps of each grok run (default {FULL_MAX_STEPS}; {QUICK_MAX_STEPS} with --quick)")
    p.add_argument("--rounds", type=int, default=None, metavar="N", help="interleaved timing rounds (default 30; 10 with --quick)")
    p.set_defaults(handler=cmd_bench)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        code = args.handler(args) or 0
        if code == EXIT_INTERRUPTED:  # stopped by Ctrl-C: another one while we exit must not kill us by signal
            import signal

            signal.signal(signal.SIGINT, signal.SIG_IGN)
        return code
    except KeyboardInterrupt:
        # A further Ctrl-C while we exit must not kill the process by signal: exit 130, as promised.
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("lab: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # only the user-fixable kinds are printed as one line; the rest keep their traceback
        from lab.errors import LabError

        if isinstance(err, (UserError, LabError)) or type(err) is ValueError:
            print(f"lab: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(err, OSError):  # filesystem trouble the lab did not foresee: still one line naming the file
            where = f"{err.filename}: " if err.filename else ""
            print(f"lab: error: {where}{err.strerror or err}", file=sys.stderr)
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
