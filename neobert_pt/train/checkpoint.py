"""Checkpoints that never lose work: ``OUTPUT_DIR/checkpoints/step_<N>/``.

Contract (see docs/contracts.md and style.md §3.7):

* a save is written to ``checkpoints/.tmp_step_<N>/`` by every rank, fsynced, sealed with a ``COMPLETE`` marker
  (step, world size and the size of every file), then atomically renamed to ``step_<N>/``; the ``latest`` pointer
  (a tiny text file, itself replaced atomically) is updated last. A process killed at any moment therefore leaves
  either the previous state or the new one, never a half checkpoint that looks whole;
* a folder counts as a checkpoint only if its marker exists and every listed file has its recorded size; anything
  else is reported as incomplete/corrupt and the newest good one is used (``latest``) or offered (explicit path);
* contents: ``accelerator.save_state`` (model — sharded DCP under FSDP2 —, optimizer, the scheduler and trainer
  counters registered with ``register_for_checkpointing``, python/numpy/torch RNG of every rank), one
  ``rank_state_<r>.pt`` per rank (that rank's data-loader position: accelerate stores custom objects from rank 0
  only), and the resolved ``config.yaml``;
* retention keeps the newest ``save_total_limit`` complete checkpoints; the newest complete one is never deleted,
  and a failed delete is logged, not raised.

Every public method that touches the filesystem is entered by all ranks (the barriers are collectives).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
MARKER = "COMPLETE"
LATEST = "latest"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp_step_"
CONFIG_FILE = "config.yaml"
RANK_STATE = "rank_state_{rank}.pt"
_STEP_RE = re.compile(rf"^{STEP_PREFIX}(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used or an output directory cannot be written; the message says what to do."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) cannot open directories; rename atomicity still holds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so a reader sees the old or the new content, never a partial file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def step_of(path: Path) -> int | None:
    """The step encoded in a ``step_<N>`` folder name, else None."""
    m = _STEP_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def verify(path: Path) -> str | None:
    """None when ``path`` is a complete checkpoint, else a one-line reason why it is not."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} does not exist"
    marker = path / MARKER
    if not marker.is_file():
        return f"{path} has no {MARKER} marker (the save was interrupted)"
    try:
        meta = json.loads(marker.read_text())
        files = meta["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{path}/{MARKER} is unreadable ({e})"
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            return f"{path} is missing {rel}"
        if f.stat().st_size != size:
            return f"{path}/{rel} has {f.stat().st_size} bytes, the marker recorded {size} (corrupt)"
    return None


def read_meta(path: Path) -> dict[str, Any]:
    """The marker's metadata (step, world_size, files) of a complete checkpoint."""
    return json.loads((Path(path) / MARKER).read_text())


class Checkpointer:
    """Saves, finds, verifies, prunes and loads checkpoints of one run directory."""

    def __init__(
        self,
        accelerator: Any,
        output_dir: str | os.PathLike,
        *,
        save_steps: int | None,
        save_total_limit: int | None,
        max_steps: int,
    ) -> None:
        self.accelerator = accelerator
        self.root = Path(output_dir) / CHECKPOINTS_DIR
        self.save_steps = save_steps
        self.save_total_limit = save_total_limit
        self.max_steps = max_steps

    # ---- queries (pure filesystem, any rank) -------------------------------------------------------------------
    def step_dirs(self) -> list[Path]:
        """All ``step_<N>`` folders, complete or not, oldest first."""
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir() if p.is_dir() and step_of(p) is not None]
        return sorted(dirs, key=lambda p: step_of(p))

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        return [p for p in self.step_dirs() if verify(p) is None]

    def latest(self) -> Path | None:
        """The newest complete checkpoint. Prefers the ``latest`` pointer; a bad target falls back with a warning."""
        pointer = self.root / LATEST
        if pointer.is_file():
            target = self.root / pointer.read_text().strip()
            reason = verify(target)
            if reason is None:
                newer = [p for p in self.complete() if step_of(p) > step_of(target)]
                return newer[-1] if newer else target
            good = self.complete()
            logger.warning(
                "checkpoint %s is not usable: %s; %s", target, reason,
                f"using the previous good checkpoint {good[-1]}" if good else "no complete checkpoint is left",
            )
            return good[-1] if good else None
        good = self.complete()
        return good[-1] if good else None

    def should_save(self, step: int) -> bool:
        """Every ``save_steps`` optimizer steps, and always at the final step."""
        return step == self.max_steps or bool(self.save_steps and step % self.save_steps == 0)

    # ---- resume resolution ------------------------------------------------------------------------------------
    def resolve_resume(self, mode: str | bool | None) -> Path | None:
        """Map ``trainer.resume_from_checkpoint`` to a checkpoint folder or None (fresh start).

        ``latest`` / ``true``: newest complete checkpoint of this run (None when there is none yet, so the same
        command starts and resumes a run). ``false`` / null: fresh start. A path: that checkpoint, which must be
        complete; otherwise the error names the newest complete one to use instead.
        """
        if mode is None or mode is False or str(mode).lower() in ("false", "none", "null", ""):
            return None
        if mode is True or str(mode).lower() in ("latest", "true"):
            found = self.latest()
            if found is None:
                bad = self.step_dirs()
                if bad:
                    logger.warning("no complete checkpoint in %s (incomplete: %s); starting fresh",
                                   self.root, ", ".join(p.name for p in bad))
            return found
        path = Path(str(mode))
        if path.is_dir() and (path / CHECKPOINTS_DIR).is_dir():  # an output dir was given: take its latest
            return Checkpointer(self.accelerator, path, save_steps=None, save_total_limit=None,
                                max_steps=self.max_steps).resolve_resume("latest")
        reason = verify(path)
        if reason is not None:
            parent = Checkpointer(self.accelerator, path.parent.parent, save_steps=None, save_total_limit=None,
                                  max_steps=self.max_steps)
            good = parent.complete() if path.parent.name == CHECKPOINTS_DIR else self.complete()
            hint = (f"; the newest complete checkpoint is {good[-1]}: pass --trainer.resume_from_checkpoint {good[-1]}"
                    if good else "")
            raise CheckpointError(f"cannot resume: {reason}{hint}")
        return path

    def check_output_dir(self, *, resuming: bool, overwrite: bool) -> None:
        """Refuse to start a fresh run on top of another run's checkpoints (all ranks call; rank 0 cleans)."""
        existing = self.step_dirs()
        if existing and not resuming:
            if not overwrite:
                raise CheckpointError(
                    f"{self.root.parent} already holds checkpoints of another run ({existing[-1].name}); "
                    "pass --trainer.resume_from_checkpoint latest to continue it, "
                    "--trainer.overwrite_output_dir true to replace it, or choose another --trainer.output_dir"
                )
            if self.accelerator.is_main_process:
                logger.warning("trainer.overwrite_output_dir: removing the previous run's checkpoints in %s", self.root)
                shutil.rmtree(self.root, ignore_errors=True)
        if self.accelerator.is_main_process and self.root.is_dir():
            for stale in self.root.glob(f"{TMP_PREFIX}*"):  # leftovers of an interrupted save
                shutil.rmtree(stale, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    # ---- save / load (collective: every rank enters) ----------------------------------------------------------
    def save(self, step: int, *, rank_state: dict[str, Any], write_config: Callable[[Path], None]) -> Path:
        """Write ``step_<step>`` atomically. Every rank calls this with its own ``rank_state``."""
        acc = self.accelerator
        rank = acc.process_index
        tmp = self.root / f"{TMP_PREFIX}{step}"
        final = self.root / f"{STEP_PREFIX}{step}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        rank_file = tmp / RANK_STATE.format(rank=rank)
        torch.save(rank_state, rank_file)
        _fsync_file(rank_file)
        if acc.is_main_process:
            write_config(tmp / CONFIG_FILE)
        acc.wait_for_everyone()
        if acc.is_main_process:
            self._seal_and_publish(tmp, final, step, acc.num_processes)
            self._prune()
        acc.wait_for_everyone()
        return final

    def _seal_and_publish(self, tmp: Path, final: Path, step: int, world_size: int) -> None:
        files: dict[str, int] = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            _fsync_file(f)
            files[str(f.relative_to(tmp))] = f.stat().st_size
        for d in sorted((p for p in tmp.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            _fsync_dir(d)
        marker = {"step": step, "world_size": world_size, "files": files}
        atomic_write_text(tmp / MARKER, json.dumps(marker, indent=1))
        if final.exists():  # re-saving a step (e.g. the final step after a resume): move the old one aside first
            trash = self.root / f".old_{final.name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        atomic_write_text(self.root / LATEST, final.name + "\n")
        logger.info("saved checkpoint %s", final)

    def _prune(self) -> None:
        if not self.save_total_limit or self.save_total_limit < 1:
            return
        good = self.complete()
        keep = set(good[-self.save_total_limit:])
        newest = good[-1] if good else None
        for p in self.step_dirs():
            if p in keep or p == newest:
                continue
            if newest is not None and step_of(p) > step_of(newest):
                continue  # an incomplete folder newer than the newest good one is left for inspection
            try:
                shutil.rmtree(p)
            except OSError as e:
                logger.warning("could not delete old checkpoint %s: %s", p, e)

    def load(self, path: Path) -> dict[str, Any]:
        """Restore everything registered with the accelerator from ``path``; return this rank's ``rank_state``."""
        acc = self.accelerator
        meta = read_meta(path)
        if meta.get("world_size") != acc.num_processes:
            raise CheckpointError(
                f"{path} was written by {meta.get('world_size')} processes and this run has {acc.num_processes}; "
                "the data position is per rank, so resume with the same number of processes"
            )
        acc.load_state(str(path))
        rank_state = torch.load(path / RANK_STATE.format(rank=acc.process_index), map_location="cpu",
                                weights_only=False)
        acc.wait_for_everyone()
        logger.info("resumed from %s (step %s)", path, meta.get("step"))
        return rank_state
