"""Batches: dynamic padding, -100 labels at pads, upstream's max_length and loss_on_pad modes."""

from __future__ import annotations

import pytest
import torch

from dstrain.batching import IGNORE_INDEX, CodonCollator, CodonDataset, count_tokens
from dstrain.codons import PAD_ID
from dstrain.errors import DstrainError
from dstrain.fasta import bundled_fasta_paths
from dstrain.prepare import prepare_dataset
from dstrain.settings import DataSettings


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The bundled H3N2 files prepared with `max_length=256`: windows of 256, 256, 67/68/69."""
    cache = tmp_path_factory.mktemp("batching") / "cache"
    return prepare_dataset(bundled_fasta_paths(), cache, DataSettings(max_length=256))


def _examples(*lengths: int) -> list[torch.Tensor]:
    return [torch.arange(5, 5 + n, dtype=torch.long) for n in lengths]


def test_dynamic_padding_to_the_longest_example():
    batch = CodonCollator()(_examples(3, 5, 1))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.shape == (3, 5) and t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"][0].tolist() == [5, 6, 7, PAD_ID, PAD_ID]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5, [1, 0, 0, 0, 0]]
    assert batch["labels"][0].tolist() == [5, 6, 7, IGNORE_INDEX, IGNORE_INDEX]
    assert torch.equal(batch["labels"][1], batch["input_ids"][1])
    assert count_tokens(batch) == (15, 9)


def test_max_length_padding_and_loss_on_pad_like_upstream():
    collate = CodonCollator.from_settings(
        DataSettings(max_length=8, padding="max_length", loss_on_pad=True)
    )
    batch = collate(_examples(3, 5))
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert torch.equal(batch["labels"], batch["input_ids"])  # pads count in the loss
    assert (batch["labels"][0, 3:] == PAD_ID).all()
    assert count_tokens(batch).num_tokens == 16

    without = CodonCollator(max_length=8, padding="max_length")(_examples(3, 5))
    assert (without["labels"][0, 3:] == IGNORE_INDEX).all()


def test_example_longer_than_max_length_is_an_error():
    with pytest.raises(DstrainError, match="--max-length 4"):
        CodonCollator(max_length=4)(_examples(5))


def test_loader_over_prepared_data(prepared):
    dataset = CodonDataset(prepared.train)
    assert len(dataset) == len(prepared.train)
    assert sorted(set(dataset.lengths().tolist()))[-1] == 256
    assert torch.equal(dataset[0], torch.from_numpy(prepared.train[0].astype("int64")))

    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=CodonCollator(256))
    real = 0
    for batch in loader:
        lengths = batch["attention_mask"].sum(dim=1)
        assert batch["input_ids"].shape[1] == int(lengths.max())
        real += count_tokens(batch).num_real_tokens
    assert real == prepared.train.num_tokens


def test_padding_mode_does_not_change_the_loss(prepared):
    """Pads are masked and ignored: a real forward pass gives the same loss either way."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=69,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        rotary_pct=0.25,
    )
    model = GPTNeoXForCausalLM(config).eval()
    order = prepared.val.lengths().argsort()
    picked = [order[0], order[-1], order[0]]  # shortest, longest, shortest
    examples = [torch.from_numpy(prepared.val[i].astype("int64")) for i in picked]
    assert len({len(e) for e in examples}) > 1
    with torch.no_grad():
        dynamic = model(**CodonCollator(256)(examples)).loss
        full = model(**CodonCollator(256, padding="max_length")(examples)).loss
        upstream = model(**CodonCollator(256, "max_length", loss_on_pad=True)(examples)).loss
    torch.testing.assert_close(dynamic, full)
    assert not torch.isclose(upstream, full)
