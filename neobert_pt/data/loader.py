"""Train loaders: infinite, deterministic streams of this rank's micro-batches, exact resume, optional workers.

The batch rule. Let B = per-device batch, W = world size, A = gradient accumulation, G = B*W (the global
micro-batch) and S = G*A (rows per optimizer step, the *global batch*). Micro-batch ``m`` (counted from the start of
training; every rank is at the same ``m``) covers global row positions ``[m*G, (m+1)*G)``; rank r takes
``[m*G + r*B, m*G + (r+1)*B)``. Where a row at a position comes from depends on the source kind:

- **map** (local files, Hub datasets, tokenized shards): each epoch is a permutation of all rows seeded by
  ``(seed, epoch)``; an epoch uses ``floor(rows / S) * S`` positions (the incomplete last global batch is
  dropped, so an optimizer step never straddles two epochs). Mask key ``(TRAIN, epoch, position in epoch)``.
- **mixture**: position p picks a source by a fixed weighted schedule (period ``MIXTURE_PERIOD``: every period
  holds each source in proportion to its weight, interleaved by largest deficit) and that source's next row in
  its own seeded per-epoch permutation. Mask key ``(TRAIN, 0, p)``.
- **stream**: documents of the shuffled stream (epoch after epoch, counted on) are dealt round-robin to S
  *lanes*; lane j packs its documents into rows, and slot j of optimizer step s is lane j's row s. A rank reads
  every raw document but tokenizes only those of the lanes it (or, with workers, the worker) serves: 1/W of the
  tokenization work. Mask key ``(TRAIN, 0, s*S + j)``.

Each rule depends on positions and S only, never on W: W ranks with batch B see exactly the rows and masks one
process with batch W*B sees, and a run may resume on another world size as long as S is unchanged.

Workers: with ``num_workers > 0`` a ``torch.utils.data.DataLoader`` runs ``num_workers`` processes; worker w builds
(reads, tokenizes, packs, collates) micro-batches ``start + w + k*num_workers`` and the DataLoader hands them out
round-robin, i.e. in order. ``prefetch_factor`` batches per worker are prepared ahead, and a thread of the
training process receives them into a queue of the same depth (so the step only dequeues); batches are pinned
for asynchronous host-to-device copies when asked. Since every batch is a function of its position, the result is
identical for any number of workers.

Resume: ``state_dict()`` is the global position of the NEXT micro-batch (``rows_consumed``) plus what must match
(S, seed, data size). Map and mixture resume costs nothing; a stream re-reads the raw documents up to the position
and re-tokenizes only this rank's (1/W) share of them.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from neobert_pt.data.collator import MLMCollator
from neobert_pt.data.errors import DataError
from neobert_pt.data.packing import PackedRows, Row, RowList, make_row

logger = logging.getLogger(__name__)

STATE_VERSION = 2
TRAIN_STREAM, EVAL_STREAM = 0, 1  # first word of a mask key: train and eval masks never share randomness
MIXTURE_PERIOD = 10_000  # positions after which the mixture schedule repeats (proportions exact per period)
TOKENIZE_BATCH = 256

Batch = dict[str, torch.Tensor]


class BatchPlan:
    """The arithmetic of the batch rule for one rank."""

    def __init__(self, *, batch_size: int, rank: int, world_size: int, rows_per_step: int | None = None) -> None:
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.global_batch = batch_size * world_size
        self.rows_per_step = rows_per_step or self.global_batch
        if self.rows_per_step % self.global_batch:
            raise ValueError(f"rows_per_step {self.rows_per_step} is not a multiple of the global micro-batch "
                             f"{self.global_batch}")
        self.accumulation = self.rows_per_step // self.global_batch

    def first(self, m: int) -> int:
        """Global position of this rank's first row in micro-batch ``m``."""
        return m * self.global_batch + self.rank * self.batch_size


class MapBatches:
    """Micro-batches over map-style rows (a pure function of the micro-batch index)."""

    kind = "map"

    def __init__(self, rows: PackedRows | RowList, collator: MLMCollator, plan: BatchPlan, *, seed: int) -> None:
        self.rows, self.collator, self.plan, self.seed = rows, collator, plan, seed
        if self.rows_per_epoch == 0:
            raise DataError(
                f"the training data has {len(rows)} rows of {collator.max_seq_length} tokens, fewer than one global "
                f"batch ({plan.batch_size} per process x {plan.accumulation} accumulation x {plan.world_size} "
                "processes); lower trainer.per_device_train_batch_size or dataset.max_seq_length, or use more data."
            )
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def rows_per_epoch(self) -> int:
        """Positions per epoch: whole optimizer steps only (the incomplete last global batch is dropped)."""
        return len(self.rows) // self.plan.rows_per_step * self.plan.rows_per_step

    @property
    def signature(self) -> dict[str, Any]:
        return {"num_rows": len(self.rows)}

    def order(self, epoch: int) -> np.ndarray:
        """Row order of ``epoch``: a permutation that depends only on (seed, epoch)."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.rows)))
        return self._order[1]

    def __call__(self, m: int) -> Batch:
        first = self.plan.first(m)
        epoch, start = divmod(first, self.rows_per_epoch)
        positions = range(start, start + self.plan.batch_size)
        order = self.order(epoch)
        return self.collator([self.rows[int(order[p])] for p in positions],
                             [(TRAIN_STREAM, epoch, p) for p in positions])

    def iterate(self, start: int, worker: int, num_workers: int) -> Iterator[Batch]:
        return map(self, itertools.count(start + worker, num_workers))


def mixture_schedule(weights: Sequence[float], period: int = MIXTURE_PERIOD) -> tuple[np.ndarray, np.ndarray,
                                                                                       np.ndarray]:
    """(source of each offset in a period, index of that row within its source's share, rows per source).

    Per period, source s gets ``c_s`` rows (largest-remainder rounding of ``period * w_s``); inside the period the
    source with the largest deficit ``(t+1) c_s / period - taken_s`` goes next, so every prefix is close to the
    weights too.
    """
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or not np.all(w > 0) or not np.isfinite(w.sum()):
        raise DataError(f"dataset.mixture weights must all be > 0 and sum to a positive number, got {list(weights)}.")
    w = w / w.sum()
    counts = np.floor(w * period).astype(np.int64)
    for s in np.argsort(-(w * period - counts), kind="stable")[: period - counts.sum()]:
        counts[s] += 1
    source = np.empty(period, dtype=np.int64)
    index = np.empty(period, dtype=np.int64)
    taken = np.zeros(len(w), dtype=np.int64)
    for t in range(period):
        s = int(np.argmax((t + 1) * counts / period - taken))
        source[t], index[t] = s, taken[s]
        taken[s] += 1
    return source, index, counts


class MixtureBatches:
    """Micro-batches drawn from several map-style sources by a weighted, position-keyed schedule."""

    kind = "mixture"

    def __init__(self, sources: Sequence[tuple[str, PackedRows, float]], collator: MLMCollator, plan: BatchPlan, *,
                 seed: int) -> None:
        self.labels = [label for label, _, _ in sources]
        self.rows = [rows for _, rows, _ in sources]
        self.collator, self.plan, self.seed = collator, plan, seed
        for label, rows in zip(self.labels, self.rows, strict=True):
            if len(rows) == 0:
                raise DataError(f"dataset.mixture source '{label}' has no rows (empty data?).")
        self.source, self.index, self.counts = mixture_schedule([w for _, _, w in sources])
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    @property
    def signature(self) -> dict[str, Any]:
        return {"sources": [[label, len(rows), int(c)] for label, rows, c in zip(self.labels, self.rows, self.counts,
                                                                                  strict=True)]}

    def locate(self, p: int) -> tuple[int, int, int]:
        """(source, source epoch, row index) of global position ``p``."""
        period, offset = divmod(p, len(self.source))
        s = int(self.source[offset])
        taken = period * int(self.counts[s]) + int(self.index[offset])
        epoch, i = divmod(taken, len(self.rows[s]))
        key = (s, epoch)
        if key not in self._orders:
            if len(self._orders) > 4 * len(self.rows):
                self._orders.clear()
            self._orders[key] = np.random.default_rng([self.seed, 1 + s, epoch]).permutation(len(self.rows[s]))
        return s, epoch, int(self._orders[key][i])

    def tokens_by_source(self, m: int) -> np.ndarray:
        """Non-pad tokens per source in global micro-batch ``m`` (all ranks' rows; arithmetic, no reading)."""
        out = np.zeros(len(self.rows), dtype=np.int64)
        for p in range(m * self.plan.global_batch, (m + 1) * self.plan.global_batch):
            s, _, i = self.locate(p)
            out[s] += int(self.rows[s].row_lengths[i])
        return out

    def __call__(self, m: int) -> Batch:
        first = self.plan.first(m)
        positions = range(first, first + self.plan.batch_size)
        rows = []
        for p in positions:
            s, _, i = self.locate(p)
            rows.append(self.rows[s][i])
        return self.collator(rows, [(TRAIN_STREAM, 0, p) for p in positions])

    def iterate(self, start: int, worker: int, num_workers: int) -> Iterator[Batch]:
        return map(self, itertools.count(start + worker, num_workers))


class _Lane:
    """One lane of a stream: its documents packed into rows, exactly like :func:`pack_stream` (never flushed)."""

    def __init__(self, max_seq_length: int, packing: bool) -> None:
        self.max_seq_length, self.packing = max_seq_length, packing
        self.rows: deque[Row] = deque()
        self.first = 0  # row number of rows[0]
        self.segments: list[np.ndarray] = []
        self.filled = 0

    def add(self, doc: np.ndarray) -> None:
        t = self.max_seq_length
        if not self.packing:
            self.rows.extend(make_row([doc[s:s + t]]) for s in range(0, len(doc), t))
            return
        pos = 0
        while pos < len(doc):
            take = min(t - self.filled, len(doc) - pos)
            self.segments.append(doc[pos:pos + take])
            self.filled += take
            pos += take
            if self.filled == t:
                self.rows.append(make_row(self.segments))
                self.segments, self.filled = [], 0

    def take(self, number: int) -> Row:
        """Row ``number`` (rows before it are dropped); the caller made sure it has been produced."""
        while self.first < number:
            self.rows.popleft()
            self.first += 1
        return self.rows[0]

    def has(self, number: int) -> bool:
        return self.first + len(self.rows) > number


class StreamBatches:
    """Micro-batches of a document stream dealt to S lanes (see the module docstring). Stateful per iterator."""

    kind = "stream"

    def __init__(self, open_epoch: Callable[[int], Iterable[str]], encode: Callable[[list[str]], list[np.ndarray]],
                 collator: MLMCollator, plan: BatchPlan, *, seed: int, holdout: str | None = None,
                 tokenize_batch: int = TOKENIZE_BATCH) -> None:
        self.open_epoch, self.encode, self.collator, self.plan, self.seed = open_epoch, encode, collator, plan, seed
        self.tokenize_batch = tokenize_batch  # own documents tokenized per call (read-ahead granularity)
        self.holdout = holdout  # how the eval hold-out was taken (for the empty-stream message)

    @property
    def signature(self) -> dict[str, Any]:
        return {}

    def slots(self, micro: int) -> range:
        """Lanes (= slots of a step) of this rank's rows in micro-batch index ``micro`` of an accumulation window."""
        first = micro * self.plan.global_batch + self.plan.rank * self.plan.batch_size
        return range(first, first + self.plan.batch_size)

    def _documents(self) -> Iterator[str]:
        for epoch in itertools.count():
            empty = True
            for text in self.open_epoch(epoch):
                empty = False
                yield text
            if empty:
                why = f" after the eval hold-out ({self.holdout})" if self.holdout else ""
                raise DataError(f"the training stream has no documents{why}; use more data"
                                + (", set dataset.eval_split, or lower the hold-out" if self.holdout else "") + ".")

    def iterate(self, start: int, worker: int, num_workers: int) -> Iterator[Batch]:
        plan = self.plan
        served = sorted({(start + worker + k * num_workers) % plan.accumulation for k in range(plan.accumulation)})
        mine = {j for i in served for j in self.slots(i)}
        lanes = {j: _Lane(self.collator.max_seq_length, self.collator.packing) for j in mine}
        docs = enumerate(self._documents())
        pending: list[tuple[int, str]] = []

        def read_until(step: int, wanted: range) -> None:
            while not all(lanes[j].has(step) for j in wanted):
                for n, text in docs:
                    if n % plan.rows_per_step in mine and text:
                        pending.append((n % plan.rows_per_step, text))
                        if len(pending) == self.tokenize_batch:
                            break
                else:
                    if not pending:
                        raise DataError("the training stream ended unexpectedly")
                for (j, _), ids in zip(pending, self.encode([text for _, text in pending]), strict=True):
                    lanes[j].add(ids)
                pending.clear()

        for m in itertools.count(start + worker, num_workers):
            step, micro = divmod(m, plan.accumulation)
            wanted = self.slots(micro)
            read_until(step, wanted)
            yield self.collator([lanes[j].take(step) for j in wanted],
                                [(TRAIN_STREAM, 0, step * plan.rows_per_step + j) for j in wanted])


class _MicroBatches(torch.utils.data.IterableDataset):
    """This rank's micro-batches from ``start``; each DataLoader worker builds every ``num_workers``-th one."""

    def __init__(self, batches: MapBatches | MixtureBatches | StreamBatches, start: int) -> None:
        self.batches, self.start = batches, start

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.batches.iterate(self.start, worker, num_workers)


class _Prefetcher:
    """A daemon thread that keeps up to ``depth`` items of ``source`` ready in a queue.

    Over a multi-process DataLoader it takes the cost of receiving a batch from a worker (shared-memory handles,
    storage rebuilds: ~1-2 ms per micro-batch) off the training thread, which then only dequeues.
    """

    _DONE = object()

    def __init__(self, source: Iterator[Batch], depth: int) -> None:
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stopped = threading.Event()
        self.source: Iterator[Batch] | None = source
        self.thread = threading.Thread(target=self._fill, args=(source,), daemon=True, name="neobert-prefetch")
        self.thread.start()

    def _fill(self, source: Iterator[Batch]) -> None:
        try:
            for item in source:
                while not self.stopped.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stopped.is_set():
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the training thread, raised there
            self.queue.put((self._DONE, err))

    def __iter__(self) -> _Prefetcher:
        return self

    def __next__(self) -> Batch:
        item = self.queue.get()
        if isinstance(item, tuple) and len(item) == 2 and item[0] is self._DONE:
            raise item[1]
        return item

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop and join the thread, then drop the source so the DataLoader shuts its workers down now.

        Joining matters: a daemon thread still inside torch's worker-receive code when the interpreter exits can
        abort the process ("terminate called without an active exception") after a run that otherwise finished.
        """
        self.stopped.set()
        while self.thread.is_alive():
            with contextlib.suppress(queue.Empty):  # unblock a put() waiting on a full queue
                while True:
                    self.queue.get_nowait()
            self.thread.join(timeout=0.1)
            timeout_s -= 0.1
            if timeout_s <= 0:
                logger.warning("the data prefetch thread did not stop within its timeout; continuing")
                break
        self.source = None  # the last reference: the DataLoader iterator's finaliser stops its workers


class TrainLoader:
    """Iterator of this rank's micro-batches with ``state_dict`` / ``load_state_dict`` (the global position)."""

    def __init__(self, batches: MapBatches | MixtureBatches | StreamBatches, *, num_workers: int = 0,
                 prefetch_factor: int = 4, pin_memory: bool = False) -> None:
        self.batches, self.plan = batches, batches.plan
        self.kind = batches.kind
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self.micro = 0  # index of the next micro-batch
        self.source_tokens = np.zeros(len(batches.labels), np.int64) if isinstance(batches, MixtureBatches) else None
        self._it: Iterator[Batch] | None = None

    @property
    def labels(self) -> list[str]:
        return list(getattr(self.batches, "labels", []))

    @property
    def collator(self) -> MLMCollator:
        return self.batches.collator

    @property
    def batch_size(self) -> int:
        return self.plan.batch_size

    def set_mlm_probability(self, p: float) -> None:
        """Masking rate of the batches from the next one on (a phase's masking schedule).

        Workers hold their own copy of the collator, so a change drops the batches they prepared and restarts
        them at the current position (exact, but it costs a worker start: prefer workers 0, or a ``step``
        schedule, with a masking rate that changes every step).
        """
        if p != self.collator.mlm_probability:
            self.collator.mlm_probability = p
            if self.num_workers:
                self.close()

    def __iter__(self) -> TrainLoader:
        return self

    def _open(self) -> Iterator[Batch]:
        dataset = _MicroBatches(self.batches, self.micro)
        if self.num_workers == 0 and not self.pin_memory:
            return iter(dataset)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
            multiprocessing_context="fork" if self.num_workers else None,
        )
        batches = iter(loader)  # workers fork here, from the training thread
        return _Prefetcher(batches, self.prefetch_factor) if self.num_workers else batches

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = self._open()
        batch = next(self._it)
        if self.source_tokens is not None:
            self.source_tokens += self.batches.tokens_by_source(self.micro)
        self.micro += 1
        return batch

    def close(self) -> None:
        """Stop the prefetch thread and the workers (they also stop when the loader is garbage-collected)."""
        if isinstance(self._it, _Prefetcher):
            self._it.close()
        self._it = None

    def state_dict(self) -> dict[str, Any]:
        state = {"version": STATE_VERSION, "kind": self.kind, "rows_consumed": self.micro * self.plan.global_batch,
                 "rows_per_step": self.plan.rows_per_step, "seed": self.batches.seed,
                 "world_size": self.plan.world_size, "batch_size": self.plan.batch_size, **self.batches.signature}
        if isinstance(self.batches, MapBatches):  # informational (phases re-pack rows and continue by tokens)
            state["rows_per_epoch"] = self.batches.rows_per_epoch
            state["epoch"] = state["rows_consumed"] // self.batches.rows_per_epoch
        if self.source_tokens is not None:
            state["source_tokens"] = dict(zip(self.labels, self.source_tokens.tolist(), strict=True))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or state.get("kind") != self.kind:
            raise DataError(f"data position from a checkpoint has kind/version {state.get('kind')}/"
                            f"{state.get('version')}, this run expects {self.kind}/{STATE_VERSION} (a different "
                            "dataset kind or an older neobert_pt); start a fresh run.")
        plan = self.plan
        if state["rows_per_step"] != plan.rows_per_step and (state["world_size"], state["batch_size"]) == (
                plan.world_size, plan.batch_size):
            # Same micro-batches, another accumulation (a phase's batch warmup, or a phase that kept its loader):
            # keep the layout the position was saved with, so the rows continue exactly.
            plan = self.plan = self.batches.plan = BatchPlan(batch_size=plan.batch_size, rank=plan.rank,
                                                             world_size=plan.world_size,
                                                             rows_per_step=state["rows_per_step"])
        if state["rows_per_step"] != plan.rows_per_step:
            raise DataError(
                f"cannot resume the data position: the global batch was {state['rows_per_step']} rows per optimizer "
                f"step in the checkpoint and is {plan.rows_per_step} now ({plan.batch_size} per device x "
                f"{plan.accumulation} accumulation x {plan.world_size} processes); keep per-device batch x "
                "accumulation x processes unchanged (a different world size is fine)."
            )
        mine = {"seed": self.batches.seed, **self.batches.signature}
        for key, value in mine.items():
            if state.get(key) != value:
                raise DataError(f"cannot resume the data position: {key} was {state.get(key)} in the checkpoint and "
                                f"is {value} now (different data or seed); positions would not match.")
        if state["rows_consumed"] % plan.global_batch:
            raise DataError(f"cannot resume the data position: {state['rows_consumed']} rows consumed is not a whole "
                            f"number of global micro-batches of {plan.global_batch} rows.")
        self.micro = state["rows_consumed"] // plan.global_batch
        self.close()
        if self.source_tokens is not None:
            self.source_tokens = np.asarray([state["source_tokens"][label] for label in self.labels], np.int64)


def eval_plan(num_rows: int, batch_size: int, max_batches: int, world_size: int) -> tuple[int, int]:
    """(per-rank batch size, batches per rank): the same on every rank, at most ``max_batches``.

    A small eval set shrinks the batch rather than giving ranks different numbers of batches (an unequal count
    would leave one rank waiting in a collective).
    """
    per_rank = min(batch_size, num_rows // world_size)
    if per_rank == 0:
        return 0, 0
    return per_rank, min(max_batches, num_rows // (per_rank * world_size))


def iter_eval_batches(rows: Any, collator: MLMCollator, *, batch_size: int, max_batches: int,
                      rank: int, world_size: int) -> Iterator[Batch]:
    """The fixed eval batches of this rank: rows in order, rank slices as in training, masks keyed by row."""
    per_rank, num_batches = eval_plan(len(rows), batch_size, max_batches, world_size)
    for g in range(num_batches):
        first = g * per_rank * world_size + rank * per_rank
        positions = range(first, first + per_rank)
        yield collator([rows[p] for p in positions], [(EVAL_STREAM, 0, p) for p in positions])
