"""Checkpoints that never lose work and never run code: ``OUTPUT_DIR/checkpoints/step_<N>/``.

Contract (see docs/contracts.md and docs/reliability.md):

* a save is written to ``checkpoints/.tmp_step_<N>/`` by every rank, fsynced, sealed with a ``COMPLETE`` marker
  (step, world size, and the size and BLAKE2b digest of every file), then atomically renamed to ``step_<N>/``; the
  ``latest`` pointer (a tiny text file, itself replaced atomically) is updated last. A process killed at any moment
  therefore leaves either the previous state or the new one, never a half checkpoint that looks whole;
* a folder counts as a checkpoint only if its marker exists and every listed file has its recorded size
  (:func:`verify`, cheap); before a checkpoint is loaded its digests are checked too (``verify(deep=True)``), and a
  mismatch falls back to the previous good checkpoint with a warning naming the file. On resume only each node's
  local main process reads and hashes (:meth:`Checkpointer.resolve_resume`, one INFO line per verified checkpoint:
  files, bytes, seconds); every rank gets the same decision through an all-gather;
* ``latest`` is the pointer's target — the current timeline. After a rewind (resuming from an older step) newer
  folders of the abandoned timeline are ignored and reported, never picked because their number is larger;
* contents, all in formats that cannot execute code when read: ``accelerator.save_state`` (single/DDP: model
  safetensors and ``optimizer.bin`` read back with ``weights_only=True``; FSDP2/HSDP: sharded DCP folders written
  by ``distributed.ShardedCheckpoint`` next to it), ``trainer_state.json`` (step,
  tokens, counters), one ``rank_state_<r>.json`` per rank (its data-loader position and its python / numpy / torch
  RNG states) and the resolved ``config.yaml``. accelerate's RNG pickles are not kept and nothing is registered as
  an accelerate custom object (those are pickles read with ``weights_only=False``). :func:`check_loadable` vets
  every file before anything is loaded: a file that would need arbitrary unpickling is refused, naming it;
* retention keeps the newest ``save_total_limit`` complete checkpoints; the newest complete one is never deleted,
  and a failed delete is logged, not raised;
* a failed save (disk full, read-only file system) removes its temporary folder and raises
  :class:`CheckpointSaveError` saying what failed and which step ``latest`` still points at.

Every public method that touches the filesystem is entered by all ranks (the barriers are collectives).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import socket
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
MARKER = "COMPLETE"
LATEST = "latest"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp_step_"
CONFIG_FILE = "config.yaml"
TRAINER_STATE = "trainer_state.json"
RANK_STATE = "rank_state_{rank}.json"
FORMAT_VERSION = 2
_STEP_RE = re.compile(rf"^{STEP_PREFIX}(\d+)$")
_HASH_CHUNK = 1 << 22


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used or an output directory cannot be written; the message says what to do."""


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed (disk full, read-only, ...); ``latest`` still points at the previous one."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file would need arbitrary code to load (e.g. a pickle); it was refused, not executed."""


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
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def file_digest(path: Path) -> str:
    """BLAKE2b-128 hex digest of a file (fast, stdlib; an integrity check, not a signature)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def step_of(path: Path) -> int | None:
    """The step encoded in a ``step_<N>`` folder name, else None."""
    m = _STEP_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def verify(path: Path, *, deep: bool = False) -> str | None:
    """None when ``path`` is a complete checkpoint, else a one-line reason why it is not.

    The cheap check compares file sizes with the marker; ``deep=True`` also recomputes every file's digest (done
    before loading, so same-size corruption or tampering is caught).
    """
    path = Path(path)
    if not path.is_dir():
        return f"{path} does not exist"
    marker = path / MARKER
    if not marker.is_file():
        return f"{path} has no {MARKER} marker (the save was interrupted)"
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
        files = meta["files"]
        entries = {rel: (e if isinstance(e, dict) else {"size": e}) for rel, e in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        return f"{path}/{MARKER} is unreadable ({type(e).__name__})"
    for rel, entry in entries.items():
        f = path / rel
        if not f.is_file():
            return f"{path} is missing {rel}"
        if f.stat().st_size != entry.get("size"):
            return f"{path}/{rel} has {f.stat().st_size} bytes, the marker recorded {entry.get('size')} (corrupt)"
    if deep:
        start, hashed = time.perf_counter(), 0
        for rel, entry in entries.items():
            if "blake2b" in entry:
                if file_digest(path / rel) != entry["blake2b"]:
                    return f"{path}/{rel} does not match the digest recorded at save time (corrupt or modified)"
                hashed += entry["size"]
        logger.info("verified checkpoint %s: blake2b digests of %d files, %d bytes, %.2f s", path,
                    sum("blake2b" in e for e in entries.values()), hashed, time.perf_counter() - start)
    return None


def read_meta(path: Path) -> dict[str, Any]:
    """The marker's metadata (step, world_size, files) of a complete checkpoint."""
    return json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))


# ---- RNG states as JSON (instead of accelerate's pickled random_states_<r>.pkl) ----------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng() -> dict[str, Any]:
    """This process's python, numpy, torch (and CUDA) RNG states as plain JSON values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


# ---- vetting files before anything is loaded --------------------------------------------------------------------
_DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class _DcpMetadataUnpickler(pickle.Unpickler):
    """Reads a DCP ``.metadata`` file allowing only the metadata classes torch writes there (no callables)."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def check_loadable(path: Path) -> None:
    """Vet every file of checkpoint ``path`` without executing anything; raise :class:`UnsafeCheckpointError`
    naming the first file that would need arbitrary unpickling or is not in the format its name says."""
    from safetensors import safe_open

    path = Path(path)
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        try:
            if f.suffix == ".pkl":
                raise ValueError("a pickle file; neobert_pt never writes one and will not unpickle it")
            if f.suffix == ".json" or f.name == MARKER:
                json.loads(f.read_text(encoding="utf-8"))
            elif f.suffix == ".yaml":
                from neobert_pt.config.yamlio import parse_yaml

                parse_yaml(f.read_text(encoding="utf-8"))
            elif f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as st:
                    st.keys()
            elif f.suffix in (".bin", ".pt"):
                if not zipfile.is_zipfile(f):
                    raise ValueError("not a torch zip archive")
                torch.load(f, map_location="cpu", weights_only=True, mmap=True)  # tensors stay on disk
            elif f.name == ".metadata":  # DCP (FSDP2): torch reads it with plain pickle, so vet it first
                with open(f, "rb") as fh:
                    _DcpMetadataUnpickler(fh).load()
        except Exception as e:  # noqa: BLE001 - every failure means: refuse this file
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UnsafeCheckpointError(
                f"refusing to load checkpoint file {f}: {reason[:300]}. Nothing from it was executed; "
                "restore the file from a trusted copy or resume from another checkpoint"
            ) from None


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())


def _describe_os_error(err: BaseException, where: Path) -> str:
    """Say why a write failed in words (torch reports a full disk as ``basic_ios::clear: iostream error``)."""
    code = getattr(err, "errno", None)
    if code is None:
        try:
            if shutil.disk_usage(where).free < (1 << 20):
                code = errno.ENOSPC
            elif not os.access(where, os.W_OK):
                code = errno.EROFS
        except OSError:
            pass
    if code == errno.ENOSPC:
        return f"no space left on the device holding {where}"
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{where} is not writable ({os.strerror(code)})"
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return f"{type(err).__name__}: {text}"


def check_writable(directory: Path) -> None:
    """Create ``directory`` if needed and prove it accepts a small write; a one-line error otherwise."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} exists and is a file, not a directory; choose another "
                              "--trainer.output_dir or remove the file")
    probe = directory / f".write_test_{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"cannot write to {directory}: {_describe_os_error(e, directory)}; fix the "
                              "permissions / free space or choose another --trainer.output_dir") from None


def _is_fresh_start(mode: str | bool | None) -> bool:
    return mode is None or mode is False or str(mode).lower() in ("false", "none", "null", "")


def merge_resume_decisions(decisions: list[dict[str, Any] | None]) -> Path | None:
    """The one resume decision of a multi-process run, from what every rank contributed to the all-gather.

    Each node's local main process contributes ``{"rank", "host", "path", "error"}`` (``path`` None = fresh
    start; ``error`` a :class:`CheckpointError` message), every other rank None. When all node leaders agree the
    result is their path (or None), or their error raised as the same :class:`CheckpointError` on every rank; when
    they disagree (node-local disks holding different checkpoints) every rank raises one line naming each answer.
    """
    answers = [d for d in decisions if d is not None]
    if not answers:
        raise CheckpointError("no process resolved --trainer.resume_from_checkpoint (no local main process "
                              "answered); this is a bug in the launch setup, please report it")
    grouped: dict[tuple[str | None, str | None], list[dict[str, Any]]] = {}
    for a in answers:
        grouped.setdefault((a["path"], a["error"]), []).append(a)
    if len(grouped) == 1:
        path, error = next(iter(grouped))
        if error is not None:
            raise CheckpointError(error)
        return None if path is None else Path(path)

    def describe(key: tuple[str | None, str | None], who: list[dict[str, Any]]) -> str:
        path, error = key
        where = ", ".join(f"rank {a['rank']} on {a['host']}" for a in who)
        what = f"error '{error}'" if error is not None else (path if path is not None else "no checkpoint (fresh start)")
        return f"{where}: {what}"

    raise CheckpointError(
        "the nodes disagree on the checkpoint to resume (" + "; ".join(describe(k, v) for k, v in grouped.items())
        + "); every node must see the same checkpoints: put trainer.output_dir on a shared filesystem, or copy the "
        "same checkpoint to every node (python -m neobert_pt.train.checkpoint_sync restore SHARED LOCAL), then "
        "relaunch"
    )


@dataclass
class Restored:
    """What :meth:`Checkpointer.load` hands back besides the accelerator-managed model and optimizer."""

    step: int
    trainer_state: dict[str, Any]  # TrainState counters (rank 0's view; identical on every rank)
    rank_state: dict[str, Any]  # this rank's data position ("data") and anything else the caller saved
    config_text: str | None  # the checkpoint's resolved config.yaml


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
        self.parent_id: str | None = None  # id of the checkpoint this process's state descends from
        # FSDP2/HSDP: the sharded model + optimizer state that accelerate's save_state does not hold
        # (train/distributed.py ShardedCheckpoint: ``save(dir)``/``load(dir)``, collective); set by the trainer.
        self.sharded: Any = None

    # ---- queries (pure filesystem, any rank) -------------------------------------------------------------------
    def step_dirs(self) -> list[Path]:
        """All ``step_<N>`` folders, complete or not, oldest first."""
        if not self.root.is_dir():
            return []
        dirs = [p for p in self.root.iterdir() if p.is_dir() and step_of(p) is not None]
        return sorted(dirs, key=lambda p: step_of(p))

    def complete(self) -> list[Path]:
        """Complete checkpoints (sizes match the marker), oldest first."""
        return [p for p in self.step_dirs() if verify(p) is None]

    def pointer_target(self) -> Path | None:
        """The folder the `latest` pointer names (not verified), or None."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return self.root / name if step_of(Path(name)) is not None else None

    def _descendants(self, target: Path) -> Path:
        """A save killed between its rename and the pointer update leaves a complete child of ``target`` newer than
        the pointer: follow such children (matched by the parent id in their marker), nothing else."""
        current = target
        while True:
            try:
                current_id = read_meta(current).get("id")
            except (OSError, ValueError):
                return current
            child = next((p for p in reversed(self.complete()) if step_of(p) > step_of(current) and current_id
                          and read_meta(p).get("parent_id") == current_id), None)
            if child is None:
                return current
            current = child

    def _first_good(self, candidates: list[Path]) -> tuple[Path | None, list[str]]:
        """The newest candidate passing the deep check, and the reasons the newer ones failed."""
        reasons = []
        for p in reversed(candidates):
            reason = verify(p, deep=True)
            if reason is None:
                return p, reasons
            reasons.append(reason)
        return None, reasons

    def latest(self) -> Path | None:
        """The checkpoint to resume on the current timeline, verified deeply (digests).

        The ``latest`` pointer decides; folders newer than its target that do not descend from it (an abandoned
        timeline after a rewind) are ignored and reported. A target that fails verification falls back to the
        previous good checkpoint with a warning naming the file.
        """
        target = self.pointer_target()
        if target is None:  # no pointer (first save was killed before publishing it): newest complete one
            found, reasons = self._first_good(self.complete())
            for r in reasons:
                logger.warning("checkpoint not usable: %s", r)
            return found
        if verify(target) is None:
            target = self._descendants(target)
        abandoned = [p.name for p in self.step_dirs() if step_of(p) > step_of(target)]
        if abandoned:
            logger.warning("ignoring %s: newer than %s, which `latest` points at (an abandoned timeline after a "
                           "rewind, or an interrupted save)", ", ".join(abandoned), target.name)
        reason = verify(target, deep=True)
        if reason is None:
            return target
        older = [p for p in self.complete() if step_of(p) < step_of(target)]
        found, reasons = self._first_good(older)
        for r in reasons:
            logger.warning("checkpoint not usable: %s", r)
        logger.warning("checkpoint %s is not usable: %s; %s", target, reason,
                       f"using the previous good checkpoint {found}" if found else "no complete checkpoint is left")
        return found

    def should_save(self, step: int) -> bool:
        """Every ``save_steps`` optimizer steps, and always at the final step."""
        return step == self.max_steps or bool(self.save_steps and step % self.save_steps == 0)

    # ---- resume resolution ------------------------------------------------------------------------------------
    def resolve_resume(self, mode: str | bool | None) -> Path | None:
        """Map ``trainer.resume_from_checkpoint`` to a checkpoint folder or None (fresh start).

        ``latest`` / ``true``: the current timeline's newest good checkpoint (None when the run has no checkpoint
        folder yet, so the same command starts and resumes a run; an error when folders exist but none is usable).
        ``false`` / null: fresh start. A path: that checkpoint, which must pass the deep check; otherwise the error
        names the newest good one to use instead.

        Every rank calls this. With several processes only each node's local main process reads the checkpoints
        and checks their digests (one read of a multi-GB checkpoint per node, not one per GPU; its warnings are
        logged once there); the node leaders' answers are gathered and every rank returns the same path, or raises
        the same one-line :class:`CheckpointError` (also when nodes see different checkpoints), see
        :func:`merge_resume_decisions`. A single process uses no collective.
        """
        if _is_fresh_start(mode):
            return None
        acc = self.accelerator
        if acc.num_processes <= 1:
            return self._resolve_here(mode)
        import torch.distributed as dist

        decision: dict[str, Any] | None = None
        own_error: BaseException | None = None
        if acc.is_local_main_process:
            decision = {"rank": acc.process_index, "host": socket.gethostname(), "path": None, "error": None}
            try:
                found = self._resolve_here(mode)
                decision["path"] = None if found is None else str(found)
            except CheckpointError as e:
                decision["error"], own_error = str(e), e
            except Exception as e:  # noqa: BLE001 - the other ranks must hear of it instead of waiting forever
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                decision["error"] = (f"cannot resolve --trainer.resume_from_checkpoint {mode}: "
                                     f"{type(e).__name__}: {first[:300]}")
                own_error = e
        decisions: list[Any] = [None] * acc.num_processes
        dist.all_gather_object(decisions, decision)
        try:
            return merge_resume_decisions(decisions)
        except CheckpointError as e:
            raise e from own_error

    def _resolve_here(self, mode: str | bool | None) -> Path | None:
        """:meth:`resolve_resume` for a non-fresh ``mode`` on this process's view of the filesystem (no collective)."""
        if mode is True or str(mode).lower() in ("latest", "true"):
            found = self.latest()
            if found is None and self.step_dirs():
                raise CheckpointError(
                    f"--trainer.resume_from_checkpoint latest: no usable checkpoint in {self.root} "
                    f"(found {', '.join(p.name for p in self.step_dirs())}, none complete and intact); pass a "
                    "checkpoint path, or start over with --trainer.resume_from_checkpoint false "
                    "--trainer.overwrite_output_dir true"
                )
            return found
        path = Path(str(mode))
        if path.is_dir() and (path / CHECKPOINTS_DIR).is_dir():  # an output dir was given: take its latest
            return Checkpointer(self.accelerator, path, save_steps=None, save_total_limit=None,
                                max_steps=self.max_steps)._resolve_here("latest")
        reason = verify(path, deep=True)
        if reason is not None:
            parent = Checkpointer(self.accelerator, path.parent.parent, save_steps=None, save_total_limit=None,
                                  max_steps=self.max_steps)
            good, _ = (parent if path.parent.name == CHECKPOINTS_DIR else self)._first_good(
                (parent if path.parent.name == CHECKPOINTS_DIR else self).complete())
            hint = (f"; the newest good checkpoint is {good}: pass --trainer.resume_from_checkpoint {good}"
                    if good else "")
            raise CheckpointError(f"cannot resume: {reason}{hint}")
        return path

    def check_output_dir(self, *, resuming: bool, overwrite: bool) -> None:
        """Refuse to start a fresh run on top of another run's checkpoints and prove the run directory and its
        checkpoints folder are writable now, not at the first save (all ranks call; rank 0 cleans and probes)."""
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
        if self.accelerator.is_main_process:
            check_writable(self.root.parent)
            check_writable(self.root)
            for stale in self.root.glob(f"{TMP_PREFIX}*"):  # leftovers of an interrupted save
                shutil.rmtree(stale, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    # ---- save / load (collective: every rank enters) ----------------------------------------------------------
    def save(self, step: int, *, rank_state: dict[str, Any], write_config: Callable[[Path], None],
             trainer_state: dict[str, Any] | None = None) -> Path:
        """Write ``step_<step>`` atomically. Every rank calls this with its own ``rank_state`` (JSON values);
        ``trainer_state`` (JSON values, the same on every rank) is written by the main process."""
        acc = self.accelerator
        rank = acc.process_index
        tmp = self.root / f"{TMP_PREFIX}{step}"
        final = self.root / f"{STEP_PREFIX}{step}"
        try:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()
            acc.save_state(str(tmp))
            if self.sharded is not None:  # FSDP2/HSDP: model and optimizer as DCP folders (train/distributed.py)
                self.sharded.save(tmp)
            for pkl in tmp.glob(f"random_states_{rank}.pkl"):  # kept as JSON below; never unpickled
                pkl.unlink()
            _write_json(tmp / RANK_STATE.format(rank=rank), {**rank_state, "rng": capture_rng()})
            if acc.is_main_process:
                _write_json(tmp / TRAINER_STATE, {"step": step, **(trainer_state or {})})
                write_config(tmp / CONFIG_FILE)
            acc.wait_for_everyone()
            if acc.is_main_process:
                self._seal_and_publish(tmp, final, step, acc.num_processes)
        except (OSError, RuntimeError) as e:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            current = self.pointer_target()
            raise CheckpointSaveError(
                f"saving checkpoint step_{step} failed: {_describe_os_error(e, self.root)}; nothing was published "
                f"and `latest` still points at {current.name if current else 'no checkpoint'}"
            ) from None
        if acc.is_main_process:
            self._prune()
        acc.wait_for_everyone()
        self.parent_id = read_meta(final).get("id")
        return final

    def _seal_and_publish(self, tmp: Path, final: Path, step: int, world_size: int) -> None:
        files: dict[str, dict[str, Any]] = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            _fsync_file(f)
            files[str(f.relative_to(tmp))] = {"size": f.stat().st_size, "blake2b": file_digest(f)}
        for d in sorted((p for p in tmp.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            _fsync_dir(d)
        marker = {"format": FORMAT_VERSION, "step": step, "world_size": world_size,
                  "id": os.urandom(8).hex(), "parent_id": self.parent_id, "files": files}
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
        newest = self.pointer_target() or (good[-1] if good else None)
        for p in self.step_dirs():
            if p in keep or p == newest:
                continue
            if newest is not None and step_of(p) > step_of(newest):
                continue  # newer than the current one (incomplete or abandoned timeline) is left for inspection
            try:
                shutil.rmtree(p)
            except OSError as e:
                logger.warning("could not delete old checkpoint %s: %s", p, e)

    def rank_state(self, path: Path) -> dict[str, Any]:
        """This rank's ``rank_state`` in ``path``, nothing else loaded. Under another world size it is rank 0's: the
        data position is global (the loader refuses it unless the global batch is unchanged) and model / optimizer
        state reshard on load (DCP), so a run may continue on a different number of processes."""
        acc = self.accelerator
        rank = acc.process_index if read_meta(Path(path)).get("world_size") == acc.num_processes else 0
        return json.loads((Path(path) / RANK_STATE.format(rank=rank)).read_text(encoding="utf-8"))

    def load(self, path: Path) -> Restored:
        """Vet every file, then restore the model and optimizer (accelerate), this rank's RNG, and return the
        trainer counters, this rank's state and the checkpoint's config. Every rank enters."""
        acc = self.accelerator
        path = Path(path)
        meta = read_meta(path)
        if meta.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{path} was written by an older neobert_pt (pickled trainer state, which is "
                                  "never loaded); resume from a checkpoint written by this version")
        if meta.get("world_size") != acc.num_processes:
            logger.info("resuming a %s-process checkpoint on %d processes", meta.get("world_size"), acc.num_processes)
        check_loadable(path)
        try:
            acc.load_state(str(path))
            if self.sharded is not None:
                self.sharded.load(path)
        except Exception as e:  # noqa: BLE001 - the files passed the checks: report what the library said
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"cannot load the model/optimizer state of {path}: {type(e).__name__}: "
                                  f"{first[:300]}") from None
        rank_state = self.rank_state(path)
        restore_rng(rank_state.pop("rng"))
        trainer_state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
        config = path / CONFIG_FILE
        acc.wait_for_everyone()
        self.parent_id = meta.get("id")
        logger.info("resumed from %s (step %s)", path, meta.get("step"))
        return Restored(step=int(meta["step"]), trainer_state=trainer_state, rank_state=rank_state,
                        config_text=config.read_text(encoding="utf-8") if config.is_file() else None)
