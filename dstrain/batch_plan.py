"""Which examples make each micro-batch, and which rank trains it: one pure plan per epoch.

numpy only (no torch); the same (lengths, layout, epoch, seed, world) give the same plan on
every rank and on every resume:

    plan = plan_epoch(lengths, mode="grouped", micro=4, tokens_per_micro_batch=8192,
                      max_length=2048, epoch=epoch, seed=seed, world=world)
    for rows in plan.share(rank):               # as many micro-batches on every rank
        examples = [[dataset[i] for i in row] for row in rows]

A micro-batch is a list of rows, a row a list of example indices: one example per row for
`random` and `grouped`, several whole examples end to end for `packed` (at most max_length
codons). Every row of a micro-batch is padded to its longest row (to max_length with
`padding="max_length"`), so a micro-batch costs rows x longest row positions; with a token
budget no micro-batch costs more than the budget, e.g. 8192 tokens = 16 examples of 512
codons or 4 of 2048 (activation memory follows rows x length).

- random: the shuffled examples in order. Without a budget, exactly a torch
  DistributedSampler's layout (rank r takes every world-th example of the shuffled order from
  r on, the order padded to a multiple of world with its first examples; cut into
  micro-batches of `micro`), so runs keep the order they always had. With a budget, the
  shuffled stream is cut wherever the next example would push rows x longest over it.
- grouped: the shuffled examples in chunks ("megabatches") of 50 micro-batches' worth, each
  sorted by length, longest first (transformers' LengthGroupedSampler sorts megabatches of
  up to 50 batches the same way), cut by count or by budget; then the micro-batches are
  shuffled, so each holds similar lengths while the stream stays random.
- packed: the shuffled examples in chunks of PACK_CHUNK_EXAMPLES, each packed best-fit
  decreasing into rows of max_length codons (every example, longest first, goes to the open
  row it fills most tightly); the rows are shuffled, then cut into micro-batches of `micro`
  rows or by budget.

Ranks: micro-batch i of the epoch goes to rank i % world. So that every rank runs the same
number (a rank short of one would leave the others waiting in the gradient all-reduce), the
list is padded to a multiple of world with the epoch's first micro-batches again, as
DistributedSampler pads with its first examples; `repeated_micro_batches` counts them.

Another world size part-way through an epoch (a resume on more or fewer ranks): the epoch
keeps the plan it was laid out with; the micro-batches the old ranks had not reached (after
the first `consumed_after(...)`) are dealt round-robin over the new ranks, padded the same
way (`plan.share(rank, world=new_world, offset=consumed)`), and the epochs after it are
planned for the new world. No micro-batch runs twice or is skipped, beyond the padding.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import numpy as np

from dstrain.errors import DstrainError

BatchingMode = Literal["random", "grouped", "packed"]
BATCHING_MODES: tuple[str, ...] = ("random", "grouped", "packed")

GROUP_CHUNK_MICRO_BATCHES = 50
"""Micro-batches' worth of examples sorted together by `grouped` (a megabatch)."""

PACK_CHUNK_EXAMPLES = 4096
"""Examples packed together by `packed`: more packs tighter, fewer mixes better (each
epoch's shuffle draws new chunks): at 4096, 99.8% of the positions of rows of 2048 hold
codons on lognormal lengths (median ~270), and 1e6 examples pack in about a second
(1024: 99.6%, 20% faster)."""


@dataclass(frozen=True, eq=False)
class EpochPlan:
    """One epoch's micro-batches, all ranks, in flat arrays (CSR style)."""

    examples: np.ndarray
    """Example indices (int64), row after row, micro-batch after micro-batch."""
    row_starts: np.ndarray
    """Row r holds examples[row_starts[r]:row_starts[r + 1]] (num_rows + 1 entries)."""
    batch_starts: np.ndarray
    """Micro-batch b holds rows batch_starts[b]:batch_starts[b + 1], before the repeats."""
    world: int
    """Data-parallel ranks the micro-batches are dealt to."""
    micro_per_rank: int
    """Micro-batches every rank runs this epoch (repeats included)."""
    repeated_examples: int
    """Examples run a second time this epoch: those of the repeated micro-batches, or for
    `random` without a budget the sampler's padding examples."""
    num_tokens: int
    """Codons in all micro-batches of the epoch (repeats included)."""
    num_positions: int
    """Positions the model computes: rows x longest row (or max_length), summed."""

    @property
    def num_micro_batches(self) -> int:
        """All ranks' micro-batches, repeats included (micro_per_rank x world)."""
        return self.micro_per_rank * self.world

    @property
    def repeated_micro_batches(self) -> int:
        """Micro-batches at the end that repeat the epoch's first ones (< world)."""
        return self.num_micro_batches - (len(self.batch_starts) - 1)

    @property
    def useful_share(self) -> float:
        """Codons / positions: the share of the computed positions that are not padding."""
        return self.num_tokens / max(self.num_positions, 1)

    def micro_batch(self, index: int) -> list[list[int]]:
        """Micro-batch `index` of the epoch (all ranks), as rows of example indices."""
        base = index % (len(self.batch_starts) - 1)
        first, last = int(self.batch_starts[base]), int(self.batch_starts[base + 1])
        starts = self.row_starts[first : last + 1].tolist()
        flat = self.examples[starts[0] : starts[-1]].tolist()
        return [flat[a - starts[0] : b - starts[0]] for a, b in pairwise(starts)]

    @property
    def num_real_micro_batches(self) -> int:
        """The epoch's micro-batches before the repeats."""
        return len(self.batch_starts) - 1

    def share(self, rank: int, *, world: int | None = None, offset: int = 0) -> RankShare:
        """The micro-batches rank `rank` runs, in order. With `offset` and `world` (a run
        resumed at another world size part-way through this epoch): the micro-batches
        after the first `offset` dealt over `world` ranks instead, padded as usual."""
        world = self.world if world is None else world
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world {world}")
        assert 0 <= offset <= self.num_real_micro_batches, offset
        return RankShare(self, rank, world, offset)


class RankShare(Sequence):
    """One rank's micro-batches of an EpochPlan: item j is the plan's offset + (j x world
    + rank) over the remaining ones (`offset` 0 and the plan's world: j x world + rank).
    The remainder is padded to a multiple of world with its own first micro-batches (the
    epoch's first ones when offset is 0, as the plan's repeats are)."""

    def __init__(self, plan: EpochPlan, rank: int, world: int | None = None, offset: int = 0):
        self.plan, self.rank, self.offset = plan, rank, offset
        self.world = plan.world if world is None else world
        self.remaining = plan.num_real_micro_batches - offset
        self._len = -(-self.remaining // self.world)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(len(self)))]
        if not -len(self) <= j < len(self):
            raise IndexError(j)
        index = ((j % len(self)) * self.world + self.rank) % self.remaining
        return self.plan.micro_batch(self.offset + index)


def consumed_after(plan_micro_batches: int, offset: int, world: int, micro_done: int) -> int:
    """Micro-batches of an epoch (before its repeats) that a run has trained on, all ranks
    together, when each of `world` ranks ran `micro_done` of the remainder after `offset`
    (micro-batch i of that remainder went to rank i % world, so the first micro_done x
    world were run; those past the remainder were repeats). The new offset of a run
    resumed at another world size: `RankShare(plan, rank, new_world, offset)`."""
    assert 0 <= offset <= plan_micro_batches and world >= 1 and micro_done >= 0
    return offset + min(micro_done * world, plan_micro_batches - offset)


def counts_vary(mode: str, tokens_per_micro_batch: int | None) -> bool:
    """Whether micro-batches per epoch can change from epoch to epoch (then a run planned by
    epochs must plan every epoch to know where it ends)."""
    return mode == "packed" or tokens_per_micro_batch is not None


def sampler_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """numpy's shuffle of one epoch (train.py passes torch's instead, see `plan_epoch`)."""
    return np.random.default_rng([seed % 2**64, epoch, 0]).permutation(num_examples)


def plan_epoch(
    lengths: np.ndarray,
    *,
    mode: BatchingMode = "random",
    micro: int,
    tokens_per_micro_batch: int | None = None,
    max_length: int,
    epoch: int,
    seed: int,
    world: int = 1,
    padding: str = "longest",
    order: np.ndarray | None = None,
) -> EpochPlan:
    """The micro-batches of one epoch for all ranks (see the module docstring).

    lengths: codons of every example; micro: examples (rows for packed) per micro-batch when
    there is no budget; max_length: a packed row's capacity, and the width of every row with
    padding="max_length"; order: the epoch's shuffled example order (default: numpy's from
    seed and epoch; train.py passes DistributedSampler's torch.randperm(generator seeded
    seed + epoch), so that random batching without a budget keeps its old order).
    Raises DstrainError when a budget cannot hold a row."""
    lengths = np.asarray(lengths, dtype=np.int64)
    num = len(lengths)
    assert num > 0 and micro >= 1 and world >= 1 and mode in BATCHING_MODES, (num, micro, mode)
    budget = tokens_per_micro_batch
    fixed = max_length if padding == "max_length" else None
    check_budget(
        lengths, mode=mode, tokens_per_micro_batch=budget, max_length=max_length, padding=padding
    )
    if order is None:
        order = sampler_order(num, seed, epoch)
    order = np.asarray(order, dtype=np.int64)
    assert order.shape == (num,), (order.shape, num)
    rng = np.random.default_rng([seed % 2**64, epoch, 1])

    if mode == "random" and budget is None:
        return _sampler_layout(lengths, order, micro, world, fixed)
    if mode == "random":
        row_starts = np.arange(num + 1)
        batch_starts = _cut(lengths[order], micro, budget, fixed)
        return _deal(lengths, order, row_starts, batch_starts, world, fixed)
    if mode == "grouped":
        per_batch = micro if budget is None else max(1, round(budget / lengths.mean()))
        chunk = GROUP_CHUNK_MICRO_BATCHES * per_batch
        # Sort each chunk of the shuffled order by length, longest first (stable: ties keep
        # the shuffle), then cut each chunk on its own.
        examples = order[_longest_first_by_chunk(lengths[order], chunk)]
        widths = lengths[examples]
        if budget is None or fixed is not None:  # by count: chunks hold whole micro-batches
            bounds = _cut(widths, micro, budget, fixed)
        else:
            cuts = [
                _cut(widths[s : s + chunk], micro, budget, None, longest_first=True)[:-1] + s
                for s in range(0, num, chunk)
            ]
            bounds = np.concatenate([*cuts, [num]])
        perm = rng.permutation(len(bounds) - 1)  # the micro-batches in a shuffled order
        sizes = np.diff(bounds)[perm]
        examples = examples[_ranges(bounds[:-1][perm], sizes)]
        batch_starts = np.concatenate([[0], np.cumsum(sizes)])
        return _deal(lengths, examples, np.arange(num + 1), batch_starts, world, fixed)
    # packed
    examples, row_starts = _pack(lengths, order, max_length, rng)
    row_tokens = np.add.reduceat(lengths[examples], row_starts[:-1])
    batch_starts = _cut(row_tokens, micro, budget, fixed)
    return _deal(lengths, examples, row_starts, batch_starts, world, fixed)


def check_budget(
    lengths: np.ndarray,
    *,
    mode: str,
    tokens_per_micro_batch: int | None,
    max_length: int,
    padding: str = "longest",
) -> None:
    """Raise DstrainError, naming the flags, when a row cannot fit: an example over a packed
    row's capacity, or a token budget below the widest row (the longest example; max_length
    when packing or padding to it)."""
    budget, fixed = tokens_per_micro_batch, padding == "max_length"
    longest = int(np.max(lengths))
    if mode == "packed" and longest > max_length:
        raise DstrainError(
            f"an example has {longest} codons, more than a packed row holds (max_length "
            f"{max_length}): the token cache was prepared with a larger --max-length. Prepare it "
            f"again with --max-length {max_length}."
        )
    if budget is None:
        return
    if fixed or mode == "packed":
        if budget < max_length:
            what = "--padding max_length pads every row" if fixed else "a packed row holds up"
            raise DstrainError(
                f"--tokens-per-micro-batch {budget} is smaller than one row: {what} to "
                f"--max-length {max_length} codons. Raise --tokens-per-micro-batch to at "
                f"least {max_length} (a multiple of it, e.g. {4 * max_length})."
            )
    elif longest > budget:
        raise DstrainError(
            f"--tokens-per-micro-batch {budget} is smaller than the longest training example "
            f"({longest} codons), and a micro-batch holds whole examples. Raise "
            f"--tokens-per-micro-batch to at least {longest} (several times it, e.g. "
            f"{4 * longest}, lets short examples share micro-batches), or prepare shorter "
            f"windows with --max-length."
        )


def _cut(
    widths: np.ndarray,
    micro: int,
    budget: int | None,
    fixed: int | None,
    *,
    longest_first: bool = False,
) -> np.ndarray:
    """Start offsets (and the end) of consecutive micro-batches over rows of `widths`: `micro`
    rows each, or as many as keep rows x longest (x `fixed`) within `budget`."""
    num = len(widths)
    if budget is not None and fixed is not None:
        micro, budget = budget // fixed, None
    if budget is None:
        return np.append(np.arange(0, num, micro), num)
    if longest_first:  # sorted: each micro-batch's first row is its longest
        widths, starts, i = widths.tolist(), [], 0
        while i < num:
            starts.append(i)
            i += budget // widths[i]
        return np.asarray([*starts, num], dtype=np.int64)
    starts, count, longest = [0], 0, 0
    for i, width in enumerate(widths.tolist()):
        wider = width if width > longest else longest
        if (count + 1) * wider > budget:
            starts.append(i)
            count, longest = 1, width
        else:
            count, longest = count + 1, wider
    starts.append(num)
    return np.asarray(starts, dtype=np.int64)


def _longest_first_by_chunk(lengths: np.ndarray, chunk: int) -> np.ndarray:
    """Positions of consecutive chunks of `lengths`, each sorted longest first (ties keep
    their order)."""
    top = int(lengths.max())
    key = (np.arange(len(lengths)) // chunk) * (top + 1) + (top - lengths)
    return np.argsort(key, kind="stable")


def _ranges(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The concatenation of arange(s, s + n) for each start s and size n."""
    offsets = np.repeat(np.cumsum(sizes) - sizes, sizes)
    return np.repeat(starts, sizes) + np.arange(int(sizes.sum())) - offsets


def _pack(
    lengths: np.ndarray, order: np.ndarray, capacity: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing per chunk of the shuffled order; rows shuffled.
    Returns (examples, row_starts)."""
    examples = order[_longest_first_by_chunk(lengths[order], PACK_CHUNK_EXAMPLES)]
    sorted_lengths = lengths[examples].tolist()
    row_of = np.empty(len(order), dtype=np.int64)
    num_rows = 0
    for start in range(0, len(order), PACK_CHUNK_EXAMPLES):
        chunk = sorted_lengths[start : start + PACK_CHUNK_EXAMPLES]
        rows, used = _best_fit_decreasing(chunk, capacity)
        row_of[start : start + len(chunk)] = np.asarray(rows) + num_rows
        num_rows += used
    new_row = rng.permutation(num_rows)[row_of]  # shuffled row order
    by_row = np.argsort(new_row, kind="stable")  # within a row: longest first
    row_starts = np.concatenate([[0], np.cumsum(np.bincount(new_row, minlength=num_rows))])
    return examples[by_row], row_starts


def _best_fit_decreasing(lengths_desc: list[int], capacity: int) -> tuple[list[int], int]:
    """Row of each item (lengths sorted longest first), and the number of rows. Open rows
    are kept as sorted keys room << 32 | row, so bisect finds the tightest fit; rows with
    less room than the shortest item are closed."""
    shift, mask = 32, (1 << 32) - 1
    # Over half a row: no open row has room (all hold a longer one), so each opens a row.
    big = bisect_left(lengths_desc, True, key=lambda n: 2 * n <= capacity)
    shortest = lengths_desc[-1] << shift
    rows = list(range(big))
    open_rows = sorted(
        key
        for r, n in enumerate(lengths_desc[:big])
        if (key := ((capacity - n) << shift) | r) >= shortest
    )
    num_rows = big
    for length in lengths_desc[big:]:
        need = length << shift
        j = bisect_left(open_rows, need)
        if j == len(open_rows):
            key = ((capacity - length) << shift) | num_rows
            num_rows += 1
        else:
            key = open_rows.pop(j) - need
        rows.append(key & mask)
        if key >= shortest:
            insort(open_rows, key)
    return rows, num_rows


def _sampler_layout(lengths, order, micro: int, world: int, fixed: int | None) -> EpochPlan:
    """DistributedSampler's shares, cut into micro-batches, as one global list: micro-batch
    j of rank r is number j x world + r."""
    num = len(order)
    per_rank = -(-num // world)
    padded = np.resize(order, per_rank * world)  # repeats the order from its start
    micro_per_rank = -(-per_rank // micro)
    shares = padded.reshape(per_rank, world).T  # row r: rank r's examples in order
    slots = np.full((world, micro_per_rank * micro), -1, dtype=np.int64)
    slots[:, :per_rank] = shares
    examples = slots.reshape(world, micro_per_rank, micro).transpose(1, 0, 2).ravel()
    examples = examples[examples >= 0]
    last = per_rank - (micro_per_rank - 1) * micro
    sizes = np.tile(np.full(micro_per_rank, micro), (world, 1)).T
    sizes[-1, :] = last
    batch_starts = np.concatenate([[0], np.cumsum(sizes.ravel())])
    plan = _deal(lengths, examples, np.arange(len(examples) + 1), batch_starts, world, fixed)
    return EpochPlan(**{**plan.__dict__, "repeated_examples": per_rank * world - num})


def _deal(lengths, examples, row_starts, batch_starts, world: int, fixed) -> EpochPlan:
    """The plan with its micro-batch count padded to a multiple of world, and its sums."""
    examples, row_starts, batch_starts = (
        np.asarray(a, dtype=np.int64) for a in (examples, row_starts, batch_starts)
    )
    num_batches = len(batch_starts) - 1
    micro_per_rank = -(-num_batches // world)
    row_tokens = np.add.reduceat(lengths[examples], row_starts[:-1])
    firsts = batch_starts[:-1]
    rows = np.diff(batch_starts)
    width = np.maximum.reduceat(row_tokens, firsts) if fixed is None else fixed
    tokens = np.add.reduceat(row_tokens, firsts)
    positions = rows * width
    per_batch_examples = np.add.reduceat(np.diff(row_starts), firsts)
    every = np.arange(micro_per_rank * world) % num_batches  # the repeats wrap to the start
    return EpochPlan(
        examples=examples,
        row_starts=row_starts,
        batch_starts=batch_starts,
        world=world,
        micro_per_rank=micro_per_rank,
        repeated_examples=int(per_batch_examples[every[num_batches:]].sum()),
        num_tokens=int(tokens[every].sum()),
        num_positions=int(np.broadcast_to(positions, rows.shape)[every].sum()),
    )
