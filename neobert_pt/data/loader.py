"""Train loaders: infinite, deterministic iterators of this rank's micro-batches with exact resume.

The batch rule (both loaders). Let B = per-device batch, W = world size, G = B*W (the global micro-batch).
Rows form a sequence per epoch (map-style: a permutation of all rows seeded by ``(seed, epoch)``; streaming: the
stream's order, documents shuffled through a buffer seeded by ``seed + epoch``). Global batch g of an epoch is
sequence positions ``[g*G, (g+1)*G)``; rank r takes positions ``[g*G + r*B, g*G + (r+1)*B)``. So W ranks with
batch B see exactly the rows (and, since masks are keyed by position, exactly the masks) that one process with
batch W*B sees, split by rank. The final incomplete global batch of an epoch is dropped, so every rank steps the
same number of times; then the next epoch starts.

Resume: ``state_dict()`` is the position of the NEXT batch. Map-style it is ``(epoch, batch_index)`` and resuming
costs nothing. Streaming it is ``(epoch, rows_consumed)``: resuming re-opens the epoch's stream (same shuffle
seed, so the same order) and re-reads and skips the consumed rows — exact, but it costs re-tokenizing them.
A state saved under a different world size is refused: the rank slices would no longer line up.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from neobert_pt.data.collator import MLMCollator
from neobert_pt.data.errors import DataError
from neobert_pt.data.packing import PackedRows, Row, RowList

STATE_VERSION = 1
TRAIN_STREAM, EVAL_STREAM = 0, 1  # first word of a mask key: train and eval masks never share randomness

Batch = dict[str, torch.Tensor]


class _PositionState:
    """Shared state handling: world-size check and the version field."""

    kind: str
    world_size: int
    rank: int

    def _check_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or state.get("kind") != self.kind:
            raise DataError(f"data position from a checkpoint has kind/version {state.get('kind')}/"
                            f"{state.get('version')}, this run expects {self.kind}/{STATE_VERSION}.")
        if state["world_size"] != self.world_size:
            raise DataError(
                f"cannot resume the data position: the checkpoint was written with {state['world_size']} "
                f"process(es) and this run has {self.world_size}; each process's share of a global batch depends "
                "on the number of processes, so resume with the same world size (or start a fresh run)."
            )


class TrainLoader(_PositionState):
    """Map-style train loader over packed rows (see the module docstring for the exact batch rule)."""

    kind = "map"

    def __init__(self, rows: PackedRows | RowList, collator: MLMCollator, *, batch_size: int, seed: int, rank: int,
                 world_size: int) -> None:
        self.rows, self.collator = rows, collator
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = len(rows) // self.global_batch
        if self.batches_per_epoch == 0:
            raise DataError(
                f"the training data has {len(rows)} rows of {collator.max_seq_length} tokens, fewer than one global "
                f"batch ({batch_size} per process x {world_size} processes); lower "
                "trainer.per_device_train_batch_size or dataset.max_seq_length, or use more data."
            )
        self.epoch = 0
        self.batch_index = 0
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """Row order of ``epoch``: a permutation that depends only on (seed, epoch)."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.rows)))
        return self._order[1]

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> Batch:
        if self.batch_index == self.batches_per_epoch:
            self.epoch, self.batch_index = self.epoch + 1, 0
        first = self.batch_index * self.global_batch + self.rank * self.batch_size
        positions = range(first, first + self.batch_size)
        order = self.order(self.epoch)
        batch = self.collator([self.rows[int(order[p])] for p in positions],
                              [(TRAIN_STREAM, self.epoch, p) for p in positions])
        self.batch_index += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "kind": self.kind, "epoch": self.epoch, "batch_index": self.batch_index,
                "world_size": self.world_size, "rank": self.rank, "batch_size": self.batch_size,
                "num_rows": len(self.rows), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state)
        for key, mine in (("batch_size", self.batch_size), ("num_rows", len(self.rows)), ("seed", self.seed)):
            if state[key] != mine:
                raise DataError(f"cannot resume the data position: {key} was {state[key]} in the checkpoint and is "
                                f"{mine} now (different data, batch size or seed); positions would not match.")
        self.epoch, self.batch_index = state["epoch"], state["batch_index"]


class StreamingTrainLoader(_PositionState):
    """Train loader over a stream of rows; ``open_epoch(e)`` returns that epoch's row iterator from its start."""

    kind = "stream"

    def __init__(self, open_epoch: Callable[[int], Iterator[Row]], collator: MLMCollator, *, batch_size: int,
                 seed: int, rank: int, world_size: int) -> None:
        self.open_epoch, self.collator = open_epoch, collator
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.global_batch = batch_size * world_size
        self.epoch = 0
        self.rows_consumed = 0  # global rows of this epoch already handed out (a multiple of global_batch)
        self._rows: Iterator[Row] | None = None

    def __iter__(self) -> StreamingTrainLoader:
        return self

    def _next_global_rows(self) -> list[Row]:
        if self._rows is None:
            self._rows = itertools.islice(self.open_epoch(self.epoch), self.rows_consumed, None)
        rows = list(itertools.islice(self._rows, self.global_batch))
        if len(rows) < self.global_batch:  # epoch over: drop the incomplete global batch, reopen
            if self.rows_consumed == 0:
                raise DataError(
                    f"the training stream yields {len(rows)} rows per epoch, fewer than one global batch "
                    f"({self.batch_size} per process x {self.world_size} processes); use more data or smaller batches."
                )
            self.epoch, self.rows_consumed = self.epoch + 1, 0
            self._rows = None
            return self._next_global_rows()
        return rows

    def __next__(self) -> Batch:
        rows = self._next_global_rows()
        first = self.rank * self.batch_size
        positions = range(self.rows_consumed + first, self.rows_consumed + first + self.batch_size)
        batch = self.collator(rows[first:first + self.batch_size], [(TRAIN_STREAM, self.epoch, p) for p in positions])
        self.rows_consumed += self.global_batch
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "kind": self.kind, "epoch": self.epoch,
                "rows_consumed": self.rows_consumed, "world_size": self.world_size, "rank": self.rank,
                "batch_size": self.batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_state(state)
        for key, mine in (("batch_size", self.batch_size), ("seed", self.seed)):
            if state[key] != mine:
                raise DataError(f"cannot resume the data position: {key} was {state[key]} in the checkpoint and is "
                                f"{mine} now; positions would not match.")
        self.epoch, self.rows_consumed = state["epoch"], state["rows_consumed"]
        self._rows = None


def eval_plan(num_rows: int, batch_size: int, max_batches: int, world_size: int) -> tuple[int, int]:
    """(per-rank batch size, batches per rank): the same on every rank, at most ``max_batches``.

    A small eval set shrinks the batch rather than giving ranks different numbers of batches (an unequal count
    would leave one rank waiting in a collective).
    """
    per_rank = min(batch_size, num_rows // world_size)
    if per_rank == 0:
        return 0, 0
    return per_rank, min(max_batches, num_rows // (per_rank * world_size))


def iter_eval_batches(rows: PackedRows | RowList, collator: MLMCollator, *, batch_size: int, max_batches: int,
                      rank: int, world_size: int) -> Iterator[Batch]:
    """The fixed eval batches of this rank: rows in order, rank slices as in training, masks keyed by row."""
    per_rank, num_batches = eval_plan(len(rows), batch_size, max_batches, world_size)
    for g in range(num_batches):
        first = g * per_rank * world_size + rank * per_rank
        positions = range(first, first + per_rank)
        yield collator([rows[p] for p in positions], [(EVAL_STREAM, 0, p) for p in positions])
