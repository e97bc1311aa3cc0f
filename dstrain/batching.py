"""Prepared codon sequences -> padded batches for `GPTNeoXForCausalLM`.

    dataset = CodonDataset(prepared.train)
    collate = CodonCollator.from_settings(data_settings)
    loader = DataLoader(dataset, batch_size=micro_batch, collate_fn=collate, ...)
    for batch in loader:
        tokens = count_tokens(batch)           # telemetry, before or after the step
        loss = engine(**batch).loss            # the batch holds model inputs only

Each batch is `{"input_ids", "attention_mask", "labels"}`, all int64 of shape
(batch, length), padded on the right with `[PAD]` (id 3). `length` is the longest example
in the batch (`padding="longest"`, the default) or `max_length` for every batch
(`padding="max_length"`, upstream GenSLM: at 2048 codons a 567-codon HA gene is 72%
padding). `labels` are the input ids (the model shifts them itself) with -100 at padding,
so pads add nothing to the loss; `loss_on_pad=True` keeps the pad id there, as upstream
did. No `[CLS]`/`[SEP]` is added, like upstream's tokenizer.
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


class TokenCounts(NamedTuple):
    """Tokens in one batch: all positions (padding included) and real codons."""

    num_tokens: int
    num_real_tokens: int


def count_tokens(batch: dict[str, torch.Tensor]) -> TokenCounts:
    """Positions and real (non-pad) tokens of a collated batch, for throughput telemetry."""
    mask = batch["attention_mask"]
    return TokenCounts(num_tokens=mask.numel(), num_real_tokens=int(mask.sum()))
