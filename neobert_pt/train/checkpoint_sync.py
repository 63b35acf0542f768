"""Mirror complete checkpoints from fast node-local disk to a shared run directory, atomically.

Cluster jobs (see ``jobs/slurm_pretrain.sbatch``) train with ``trainer.output_dir`` on local scratch and run
``python -m neobert_pt.train.checkpoint_sync watch LOCAL SHARED`` beside the trainer:

* only checkpoints that pass :func:`neobert_pt.train.checkpoint.verify` are copied (a save in progress never is);
* each copy goes to ``SHARED/checkpoints/.sync_step_<N>`` and is renamed into place only when complete, then the
  shared ``latest`` pointer is updated — so the shared directory always holds a loadable newest checkpoint;
* older shared checkpoints beyond ``--keep`` are removed only after the newer one is in place;
* ``restore`` copies the newest shared checkpoint (and the run files next to it) onto a fresh node before relaunch,
  so ``--trainer.resume_from_checkpoint latest`` finds it locally after a requeue.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

from neobert_pt.train.checkpoint import CHECKPOINTS_DIR, LATEST, atomic_write_text, step_of, verify

logger = logging.getLogger("neobert_pt.checkpoint_sync")
_RUN_FILES = ("config.yaml", "metrics.jsonl")


def complete_steps(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run directory, oldest first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None and verify(p) is None]
    return sorted(dirs, key=step_of)


def _copy_dir_atomically(src: Path, dst_root: Path) -> Path:
    final = dst_root / src.name
    tmp = dst_root / f".sync_{src.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    reason = verify(tmp)
    if reason is not None:  # the source changed under us (pruned mid-copy): drop this attempt
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"copy of {src} is incomplete: {reason}")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def _copy_file_atomically(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.sync")
    shutil.copy2(src, tmp)
    tmp.replace(dst)


def sync_once(local: Path, shared: Path, keep: int | None = None) -> Path | None:
    """Copy the newest complete local checkpoint to ``shared`` if it is not there yet; returns what was copied."""
    local_ckpts = complete_steps(local)
    if not local_ckpts:
        return None
    newest = local_ckpts[-1]
    dst_root = Path(shared) / CHECKPOINTS_DIR
    dst_root.mkdir(parents=True, exist_ok=True)
    if verify(dst_root / newest.name) is None:
        return None
    copied = _copy_dir_atomically(newest, dst_root)
    for name in _RUN_FILES:
        if (Path(local) / name).is_file():
            _copy_file_atomically(Path(local) / name, Path(shared) / name)
    atomic_write_text(dst_root / LATEST, newest.name)
    if keep:
        for old in complete_steps(shared)[:-keep]:
            try:
                shutil.rmtree(old)
            except OSError as exc:  # never fail the job over housekeeping
                logger.warning("could not remove old shared checkpoint %s: %s", old, exc)
    logger.info("synced %s -> %s", newest, copied)
    return copied


def restore(shared: Path, local: Path) -> Path | None:
    """Seed an empty local run directory from the newest complete shared checkpoint (after a requeue)."""
    if complete_steps(local):
        return None
    shared_ckpts = complete_steps(shared)
    if not shared_ckpts:
        return None
    dst_root = Path(local) / CHECKPOINTS_DIR
    dst_root.mkdir(parents=True, exist_ok=True)
    copied = _copy_dir_atomically(shared_ckpts[-1], dst_root)
    for name in _RUN_FILES:
        if (Path(shared) / name).is_file():
            _copy_file_atomically(Path(shared) / name, Path(local) / name)
    atomic_write_text(dst_root / LATEST, copied.name)
    return copied


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m neobert_pt.train.checkpoint_sync", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("once", "watch", "restore"))
    p.add_argument("src", type=Path, help="once/watch: local run dir; restore: shared run dir")
    p.add_argument("dst", type=Path, help="once/watch: shared run dir; restore: local run dir")
    p.add_argument("--keep", type=int, default=2, help="Shared checkpoints to keep (newest first).")
    p.add_argument("--interval", type=float, default=60.0, help="watch: seconds between scans.")
    p.add_argument("--until-file", type=Path, default=None, help="watch: stop (after a last sync) once this exists.")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s checkpoint_sync: %(message)s")
    if args.command == "restore":
        restored = restore(args.src, args.dst)
        print(f"restored {restored}" if restored else "nothing to restore")
        return 0
    if args.command == "once":
        sync_once(args.src, args.dst, args.keep)
        return 0
    while True:
        stop = args.until_file is not None and args.until_file.exists()
        try:
            sync_once(args.src, args.dst, args.keep)
        except OSError as exc:
            logger.warning("sync failed, will retry: %s", exc)
        if stop:
            return 0
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
