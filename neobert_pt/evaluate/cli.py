"""``python -m neobert_pt.evaluate MODEL_OR_RUN_DIR --suite probe pppl glue ner embeddings``.

MODEL_OR_RUN_DIR: a run directory (uses final/), a model directory (config.json), a training checkpoint
(RUN/checkpoints/step_N) or a Hub id (owner/name). Results are merged into eval_results.json / eval_results.md next to
the model (see --output-dir). Under ``accelerate launch`` the work of every suite is split over the processes.
User errors (missing files, unreachable Hub, bad options) end with ONE line on stderr and exit code 2
(neobert_pt.cli.run_cli; ``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

from neobert_pt.evaluate import SUITES

logger = logging.getLogger("neobert_pt.evaluate")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m neobert_pt.evaluate",
        description="Downstream evaluation of a NeoBERT encoder (suites, recipes and definitions: docs/evaluation.md). "
                    "Results are merged into eval_results.json / eval_results.md next to the model.",
        epilog="examples: python -m neobert_pt.evaluate outputs/tiny --suite probe pppl | "
               "... outputs/run/checkpoints/step_2000 --suite pppl | ... outputs/run --suite glue --glue-data ~/glue | "
               "accelerate launch -m neobert_pt.evaluate outputs/run --suite glue",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="run dir, final/ or model dir, checkpoints/step_N, or a Hub id")
    p.add_argument("--suite", nargs="+", choices=SUITES, default=["probe", "pppl"], help="suites to run")
    p.add_argument("--output-dir", type=Path, default=None, help="where results go (default: next to the model)")
    p.add_argument("--batch-size", type=int, default=64, help="rows per forward for probe/pppl/embeddings")
    p.add_argument("--seed", type=int, default=0, help="seed of the probe and of the random-init baseline")
    p.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is present")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    g = p.add_argument_group("probe")
    g.add_argument("--probe-window", type=int, default=32, help="tokens per window")
    g.add_argument("--probe-max-windows", type=int, default=1500, help="windows sampled from the corpus")
    g.add_argument("--no-baseline", action="store_true", help="skip the random-init baseline")
    g = p.add_argument_group("pppl")
    g.add_argument("--pppl-data", type=Path, default=None,
                   help=".txt (blank-line separated) or .jsonl ('text') file; default: embedded corpus hold-out")
    g.add_argument("--pppl-eval-fraction", type=float, default=None,
                   help="embedded hold-out fraction (default: the run's dataset.eval_fraction, else 0.05)")
    g.add_argument("--pppl-max-length", type=int, default=None, help="window length (default: the run's dataset.max_seq_length, else min(max positions, 512))")
    g.add_argument("--pppl-max-tokens", type=int, default=None, help="cap on scored tokens")
    g = p.add_argument_group("glue")
    g.add_argument("--glue-recipe", type=Path, default=None, help="YAML recipe (default: configs/evaluation/glue.yaml)")
    g.add_argument("--glue-tasks", nargs="+", default=None, help="subset of the recipe's tasks")
    g.add_argument("--glue-data", type=Path, default=None,
                   help="local GLUE data: DIR/<task>/ is a save_to_disk folder or train/validation files")
    g = p.add_argument_group("ner")
    g.add_argument("--ner-recipe", type=Path, default=None, help="YAML recipe (default: configs/evaluation/ner.yaml)")
    g.add_argument("--ner-data", type=Path, default=None,
                   help="CoNLL-2003 files: DIR/train.txt, DIR/validation.txt [, DIR/test.txt]")
    g = p.add_argument_group("embeddings")
    g.add_argument("--sts-data", type=Path, default=None,
                   help="jsonl/csv/tsv of sentence1, sentence2, score pairs; default: STS-B validation of --glue-data")
    g.add_argument("--pooling", choices=("mean", "cls"), default="mean", help="sentence pooling")
    g.add_argument("--mteb-tasks", nargs="*", default=None, help="MTEB task names (needs the mteb package)")
    return p


def _run_defaults(source) -> tuple[float, int | None]:
    """(embedded hold-out fraction, PPPL window length) of the run that produced the model, when known."""
    if source.run_dir is not None and (source.run_dir / "config.yaml").is_file():
        from neobert_pt.config import load_config

        run = load_config(source.run_dir / "config.yaml")
        fraction = run.dataset.eval_fraction if run.dataset.name == "embedded" and run.dataset.eval_fraction else 0.05
        return fraction, run.dataset.max_seq_length
    return 0.05, None


def run_suites(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from accelerate import Accelerator

    from neobert_pt.evaluate.loading import load_tokenizer, resolve_model
    from neobert_pt.evaluate.results import results_markdown, write_results
    from neobert_pt.train.distributed import make_accelerator

    # the launch's process group (gloo on CPU ranks) and device; models are never wrapped: suites split the work
    acc = Accelerator(cpu=True) if args.cpu else make_accelerator()
    source = resolve_model(args.model, args.output_dir)
    progress = not args.no_progress and acc.is_main_process
    try:
        tokenizer = load_tokenizer(source.model_dir)
        done: dict[str, dict[str, Any]] = {}
        mlm = None
        if {"probe", "pppl"} & set(args.suite):
            from neobert_pt.modeling import NeoBERTForMaskedLM

            # masked-only decoding: PPPL needs the logits of the masked slot of each row, nothing else
            mlm = NeoBERTForMaskedLM.from_pretrained(source.model_dir, masked_logits_only=True).to(acc.device).eval()
        for suite in args.suite:
            logger.info("suite %s on %s", suite, source.spec)
            if suite == "probe":
                from neobert_pt.evaluate.suites import run_probe

                done[suite] = run_probe(mlm.model, tokenizer, window=args.probe_window, max_windows=args.probe_max_windows,
                                        seed=args.seed, batch_size=args.batch_size, baseline=not args.no_baseline,
                                        progress=progress)
            elif suite == "pppl":
                from neobert_pt.evaluate.data import read_texts
                from neobert_pt.evaluate.suites import run_pppl

                texts = read_texts(args.pppl_data) if args.pppl_data else None
                fraction, train_length = _run_defaults(source)
                done[suite] = run_pppl(mlm, tokenizer, texts=texts, source=str(args.pppl_data or "") or None,
                                       eval_fraction=args.pppl_eval_fraction or fraction,
                                       max_length=args.pppl_max_length or train_length,
                                       max_tokens=args.pppl_max_tokens, batch_size=args.batch_size,
                                       progress=progress)
            elif suite == "glue":
                from neobert_pt.evaluate.glue import run_glue

                done[suite] = run_glue(source.model_dir, tokenizer, recipe_path=args.glue_recipe,
                                       tasks=args.glue_tasks, data_dir=args.glue_data, device=acc.device,
                                       progress=progress)
            elif suite == "ner":
                from neobert_pt.evaluate.ner import run_ner

                done[suite] = run_ner(source.model_dir, tokenizer, recipe_path=args.ner_recipe,
                                      data_dir=args.ner_data, device=acc.device, progress=progress)
            elif suite == "embeddings":
                from neobert_pt.evaluate.embeddings import run_embeddings

                done[suite] = run_embeddings(source.model_dir, tokenizer, sts_path=args.sts_data,
                                             glue_dir=args.glue_data, pooling=args.pooling,
                                             mteb_tasks=args.mteb_tasks, batch_size=args.batch_size,
                                             device=acc.device, output_dir=source.results_dir)
            if acc.is_main_process:
                path = write_results(source.results_dir, source.display_name, source.step, {suite: done[suite]})
        if acc.is_main_process and done:
            from neobert_pt.evaluate.results import read_results

            print(results_markdown({**read_results(source.results_dir), "suites": done}))
            print(f"results: {path} (+ {path.with_suffix('.md').name})")
        acc.wait_for_everyone()
        return done
    finally:
        source.cleanup()


def _main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_suites(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success; a user error (EvalError, ConfigError, ...) is one stderr line and exit 2 (``--debug``:
    the traceback)."""
    from neobert_pt.cli import run_cli

    return run_cli(_main, argv, prog="python -m neobert_pt.evaluate")
