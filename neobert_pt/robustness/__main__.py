"""``python -m neobert_pt.robustness run|evaluate|plan``: the logic behind jobs/experiment_dion2_robustness.sh.

``run`` executes every incomplete run of the selected matrix (completed runs are skipped, a failed run is recorded
and the matrix goes on), then evaluates the gates and writes the report. ``evaluate`` only reads what is recorded.
Exit code: 0 when every fatal gate passes, 1 otherwise, 2 on bad arguments, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from neobert_pt.robustness.gates import all_fatal_passed, evaluate
from neobert_pt.robustness.matrix import PROFILES, STAGES, VARIANTS, Selection, plan_runs
from neobert_pt.robustness.records import read_record
from neobert_pt.robustness.report import stdout_summary, write_report
from neobert_pt.robustness.runner import run_plan


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v for v in value.replace(",", " ").split() if v)


def _steps(value: str) -> dict[str, int]:
    """'A=20,D=100' -> {'A': 20, 'D': 100}."""
    out = {}
    for item in _csv(value):
        stage, _, n = item.partition("=")
        if stage not in STAGES or not n.isdigit():
            raise argparse.ArgumentTypeError(f"bad step budget {item!r}; use STAGE=N with STAGE in {STAGES}")
        out[stage] = int(n)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m neobert_pt.robustness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("run", "evaluate", "plan"))
    p.add_argument("--profile", choices=sorted(PROFILES), default="paper")
    p.add_argument("--output-root", type=Path, required=True, help="Where runs, logs and the report go.")
    p.add_argument("--stages", type=_csv, default=STAGES, help="Subset of A,B,C,D,E.")
    p.add_argument("--variants", type=_csv, default=VARIANTS, help=f"Subset of {','.join(VARIANTS)}.")
    p.add_argument("--seeds", type=lambda v: tuple(int(s) for s in _csv(v)), default=None, help="Stage-D seeds.")
    p.add_argument("--steps", type=_steps, default={}, help="Per-stage step budgets, e.g. 'A=50,D=2000'.")
    p.add_argument("--no-fsdp2", action="store_true", help="Skip stage C and the FSDP2 half of stage E.")
    p.add_argument("--fsdp2-config", default=None, help="Accelerate FSDP2 config (default: the profile's).")
    p.add_argument("--num-processes", type=int, default=2)
    p.add_argument("--python-bin", default=sys.executable)
    p.add_argument("--accelerate-bin", default="accelerate")
    p.add_argument("--run-timeout", type=float, default=None, help="Kill a run after this many seconds.")
    p.add_argument("--strict", action="store_true", help="Throughput gates become fatal.")
    p.add_argument("--override", action="append", default=[], help="Extra 'KEY VALUE' override for every run.")
    return p


def main(argv: list[str] | None = None) -> int:
    """User errors are one stderr line + exit 2 (neobert_pt/cli.py); ``--debug`` shows the traceback."""
    from neobert_pt.cli import run_cli

    return run_cli(_main, argv, prog="python -m neobert_pt.robustness")


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    profile = PROFILES[args.profile]
    extra = tuple(tok for item in args.override for tok in item.split(None, 1))
    sel = Selection(stages=args.stages, variants=args.variants, seeds=args.seeds, steps=args.steps,
                    run_fsdp2=not args.no_fsdp2, fsdp2_config=args.fsdp2_config, num_processes=args.num_processes,
                    python_bin=args.python_bin, accelerate_bin=args.accelerate_bin, extra_overrides=extra)
    try:
        runs = plan_runs(profile, sel, args.output_root.resolve())
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "plan":
        for run in runs:
            print(f"stage {run.stage} {run.mode:<6} {run.variant:<9} seed {run.seed:<5} {run.role:<9} {run.shell_command}")
        return 0
    if args.command == "run":
        try:
            run_plan(runs, output_root=args.output_root.resolve(), cwd=Path.cwd(), timeout_s=args.run_timeout)
        except KeyboardInterrupt:
            print("\ninterrupted: completed runs are recorded; re-run the same command to finish the matrix",
                  file=sys.stderr)
            return 130
    records = {r.name: read_record(r.name, r.output_dir) for r in runs}
    gates = evaluate(runs, records, profile, strict=args.strict)
    payload = write_report(runs, records, gates, profile, args.output_root)
    print(stdout_summary(payload, args.output_root))
    return 0 if all_fatal_passed(gates) else 1


if __name__ == "__main__":
    sys.exit(main())
