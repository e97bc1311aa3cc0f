"""Prepared codon sequences -> padded or packed batches for `GPTNeoXForCausalLM`.

    dataset = CodonDataset(prepared.train)
    collate = CodonCollator.from_settings(data_settings)
    loader = DataLoader(dataset, batch_size=micro_batch, collate_fn=collate, ...)
    for batch in loader:
        tokens = count_tokens(batch)           # telemetry, before or after the step
        loss = engine(**batch, use_cache=False).loss  # the batch holds model inputs only

Each batch is `{"input_ids", "attention_mask", "labels"}`, all int64 of shape
(batch, length), padded on the right with `[PAD]` (id 3). `length` is the longest example
in the batch (`padding="longest"`, the default) or `max_length` for every batch
(`padding="max_length"`, upstream GenSLM: at 2048 codons a 567-codon HA gene is 72%
padding). `labels` are the input ids (the model shifts them itself) with -100 at padding,
so pads add nothing to the loss; `loss_on_pad=True` keeps the pad id there, as upstream
did. No `[CLS]`/`[SEP]` is added, like upstream's tokenizer.

`PackedCollator` takes rows instead of examples: each row is a list of whole examples
whose codons add up to at most `max_length`, laid end to end. Its batch is
`{"input_ids", "labels", "position_ids"}` (int64, (rows, length), no `attention_mask`):

    input_ids     a1 a2 a3 b1 b2 PAD PAD      (rows padded on the right like above)
    position_ids   0  1  2  0  1   0   1      (restart at each example; pads are a segment)
    labels      -100 a2 a3 -100 b2 -100 -100  (no example learns to predict the next one)

Attention stays inside each example because the batch has position ids and no 2-D
attention mask: transformers (5.x, `masking_utils.create_causal_mask`) then reads a new
segment wherever a position id does not follow its left neighbour by 1 and builds the
block-diagonal causal mask itself (a (rows, 1, length, length) bool mask for `sdpa`, the
additive float one for `eager`; `flash_attention_2` takes segment lengths from the
position ids instead). It does so only without a KV cache, so call the model with
`use_cache=False` (GPT-NeoX's config defaults to a cache, and with one the examples of a
row attend to each other). Per example, logits, loss and gradients equal the example run
alone; the micro-batch loss (the model's mean over predicted tokens) equals that of the
same examples in a padded batch. `count_tokens` and `count_examples` read both kinds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from dstrain.codons import PAD_ID
from dstrain.errors import DstrainError
from dstrain.prepare import TokenSplit
from dstrain.settings import DataSettings

IGNORE_INDEX = -100
"""Label value that `torch.nn.functional.cross_entropy` (and HF models) skip."""


class CodonDataset(torch.utils.data.Dataset):
    """The examples of one prepared split as int64 tensors (read from the memory map)."""

    def __init__(self, split: TokenSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.split[index].astype(np.int64))

    def lengths(self) -> np.ndarray:
        """Codon count of every example, for length-aware samplers."""
        return self.split.lengths()


@dataclass(frozen=True)
class CodonCollator:
    """Pads a list of 1-D id tensors into a model-input batch (see the module docstring)."""

    max_length: int = 2048
    padding: str = "longest"
    loss_on_pad: bool = False

    @classmethod
    def from_settings(cls, settings: DataSettings) -> CodonCollator:
        return cls(settings.max_length, settings.padding, settings.loss_on_pad)

    def __call__(self, examples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        longest = max(len(e) for e in examples)
        if longest > self.max_length:
            raise DstrainError(
                f"an example has {longest} codons but max_length is {self.max_length}: the "
                f"token cache was prepared with a larger --max-length. Prepare it again with "
                f"--max-length {self.max_length}."
            )
        width = self.max_length if self.padding == "max_length" else longest
        input_ids = torch.full((len(examples), width), PAD_ID, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            input_ids[row, : len(example)] = example
            attention_mask[row, : len(example)] = 1
        labels = input_ids.clone()
        if not self.loss_on_pad:
            labels[attention_mask == 0] = IGNORE_INDEX
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass(frozen=True)
class PackedCollator:
    """Packs rows of whole examples into a model-input batch (see the module docstring).

    `max_length` is a row's capacity in codons; `padding="max_length"` pads every row to it
    (fixed shapes), `"longest"` to the longest row of the micro-batch.
    """

    max_length: int = 2048
    padding: str = "longest"

    @classmethod
    def from_settings(cls, settings: DataSettings) -> PackedCollator:
        if settings.loss_on_pad:
            raise DstrainError(
                "--loss-on-pad trains on padding, and packed batches have almost none: a "
                "packed row holds several examples with attention kept inside each one. Drop "
                "--loss-on-pad, or use --batching random (or grouped) to reproduce upstream's "
                "padded loss."
            )
        return cls(settings.max_length, settings.padding)

    def __call__(self, rows: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        lengths = [sum(len(e) for e in row) for row in rows]
        if not rows or not all(row for row in rows):
            raise DstrainError("a packed micro-batch needs at least one example in every row.")
        if max(lengths) > self.max_length:
            row = max(range(len(rows)), key=lengths.__getitem__)
            raise DstrainError(
                f"packed row {row} holds {len(rows[row])} examples of "
                f"{[len(e) for e in rows[row]]} codons = {lengths[row]} codons, over the row "
                f"capacity max_length={self.max_length}. Rows must be planned to at most "
                f"--max-length codons each; an example longer than that comes from a token "
                f"cache prepared with a larger --max-length: prepare it again with "
                f"--max-length {self.max_length}."
            )
        width = self.max_length if self.padding == "max_length" else max(lengths)
        input_ids, position_ids = [], []
        for row, length in zip(rows, lengths, strict=True):
            tail = torch.full((width - length,), PAD_ID, dtype=torch.long)
            input_ids.append(torch.cat([*(e.long() for e in row), tail]))
            # 0.. per example, and the padding tail as one more segment of its own
            position_ids.append(torch.cat([torch.arange(n) for n in [*map(len, row), len(tail)]]))
        input_ids, position_ids = torch.stack(input_ids), torch.stack(position_ids)
        pad = input_ids == PAD_ID
        if int(pad.sum()) != sum(width - n for n in lengths):
            raise DstrainError(
                f"an example holds the [PAD] id {PAD_ID}, which `dstrain prepare` never writes: "
                f"the token cache is not dstrain's. Prepare it again with `dstrain prepare`."
            )
        labels = input_ids.masked_fill(pad | (position_ids == 0), IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


class TokenCounts(NamedTuple):
    """Tokens in one batch: all positions (padding included) and real codons."""

    num_tokens: int
    num_real_tokens: int


def count_tokens(batch: dict[str, torch.Tensor]) -> TokenCounts:
    """Positions and real (non-pad) tokens of a collated batch (either collator), for
    throughput telemetry. A packed batch has no `attention_mask`: its pads are the `[PAD]`
    ids, which no prepared example holds (`PackedCollator` checks)."""
    mask = batch.get("attention_mask")
    real = batch["input_ids"] != PAD_ID if mask is None else mask.bool()
    return TokenCounts(num_tokens=real.numel(), num_real_tokens=int(real.sum()))


def count_examples(batch: dict[str, torch.Tensor]) -> int:
    """Examples in a collated batch: its rows, or in a packed batch its segments that
    start a real example (position id 0 on a non-pad token)."""
    positions = batch.get("position_ids")
    if positions is None:
        return batch["input_ids"].shape[0]
    return int(((positions == 0) & (batch["input_ids"] != PAD_ID)).sum())
