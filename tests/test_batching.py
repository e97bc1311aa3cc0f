"""Batches: dynamic padding, -100 labels at pads, upstream's max_length and loss_on_pad modes;
the batch plan (random, length-grouped, packed; token budgets; equal shares per rank)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dstrain import batch_plan
from dstrain.batch_plan import plan_epoch
from dstrain.batching import IGNORE_INDEX, CodonCollator, CodonDataset, count_tokens
from dstrain.codons import PAD_ID
from dstrain.errors import DstrainError
from dstrain.fasta import bundled_fasta_paths
from dstrain.prepare import prepare_dataset
from dstrain.settings import DataSettings
from dstrain.train import RunPlan, plan_run


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


# --------------------------------------------------------------------------------------
# The batch plan (dstrain.batch_plan): pure numpy, no model
# --------------------------------------------------------------------------------------

SARS_COV_2_GENES = (2048, 2048, 2048, 952, 1273, 419, 275, 222, 121, 121, 75, 61, 38)
"""Codons of the SARS-CoV-2 genes (ORF1ab as 2048-codon windows; issue 14's list)."""


def mixed_lengths(genomes: int = 30) -> np.ndarray:
    """A mixed-length set like the bundled data: the genes of `genomes` SARS-CoV-2
    genomes, 96 HA records (579 codons) and 48 NA records (469 codons)."""
    return np.array(SARS_COV_2_GENES * genomes + (579,) * 96 + (469,) * 48)


def plan(lengths, mode="random", micro=4, budget=None, world=1, epoch=0, **kw):
    return plan_epoch(
        lengths,
        mode=mode,
        micro=micro,
        tokens_per_micro_batch=budget,
        max_length=kw.pop("max_length", 2048),
        epoch=epoch,
        seed=kw.pop("seed", 0),
        world=world,
        **kw,
    )


def ranks_of(epoch_plan) -> list[list[list[list[int]]]]:
    return [list(epoch_plan.share(rank)) for rank in range(epoch_plan.world)]


LAYOUTS = [
    ("random", None),
    ("random", 4096),
    ("grouped", None),
    ("grouped", 4096),
    ("packed", None),
    ("packed", 4096),
]


@pytest.mark.parametrize(("mode", "budget"), LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("small_chunks", [False, True])
def test_every_example_once_equal_shares_and_the_budget_holds(
    mode, budget, world, small_chunks, monkeypatch
):
    lengths = mixed_lengths(3)  # 183 examples: no count divides evenly
    if small_chunks:  # several megabatches / packing chunks per epoch, as on real data sets
        monkeypatch.setattr(batch_plan, "GROUP_CHUNK_MICRO_BATCHES", 2)
        monkeypatch.setattr(batch_plan, "PACK_CHUNK_EXAMPLES", 17)
    epoch_plan = plan(lengths, mode, micro=3, budget=budget, world=world, epoch=1)
    shares = ranks_of(epoch_plan)
    assert {len(share) for share in shares} == {epoch_plan.micro_per_rank}  # no rank waits
    seen = np.zeros(len(lengths), dtype=int)
    for share in shares:
        for rows in share:
            widths = [int(lengths[row].sum()) for row in rows]
            assert max(widths) <= 2048
            if budget is not None:
                assert len(rows) * max(widths) <= budget
            else:
                assert len(rows) <= 3
            if mode != "packed":
                assert all(len(row) == 1 for row in rows)
            for row in rows:
                np.add.at(seen, row, 1)
    assert seen.min() == 1  # every example, and only the tail's again
    assert seen.sum() - len(lengths) == epoch_plan.repeated_examples
    assert epoch_plan.repeated_micro_batches < world
    if budget is not None or mode != "random":  # the repeats are the epoch's first ones
        first = [epoch_plan.micro_batch(i) for i in range(epoch_plan.repeated_micro_batches)]
        total = epoch_plan.num_micro_batches
        tail = [epoch_plan.micro_batch(total - len(first) + i) for i in range(len(first))]
        assert tail == first
        assert epoch_plan.repeated_examples == sum(len(r) for rows in first for r in rows)


@pytest.mark.parametrize(("mode", "budget"), LAYOUTS)
def test_the_plan_is_deterministic_and_reshuffled_every_epoch(mode, budget):
    lengths = mixed_lengths(3)
    a, b = plan(lengths, mode, budget=budget, world=2), plan(lengths, mode, budget=budget, world=2)
    assert ranks_of(a) == ranks_of(b)
    assert ranks_of(a) != ranks_of(plan(lengths, mode, budget=budget, world=2, epoch=1))
    assert ranks_of(a) != ranks_of(plan(lengths, mode, budget=budget, world=2, seed=1))


@pytest.mark.parametrize(("num_examples", "world", "micro"), [(7, 2, 3), (50, 4, 4), (5, 8, 2)])
def test_random_without_a_budget_is_the_distributed_samplers_order(num_examples, world, micro):
    from torch.utils.data import DistributedSampler

    generator = torch.Generator()
    generator.manual_seed(3 + 2)  # seed + epoch, as the sampler seeds it
    order = torch.randperm(num_examples, generator=generator).numpy()
    epoch_plan = plan(np.ones(num_examples), micro=micro, world=world, epoch=2, order=order)
    for rank in range(world):
        sampler = DistributedSampler(range(num_examples), world, rank, shuffle=True, seed=3)
        sampler.set_epoch(2)
        expected = list(sampler)
        expected = [expected[i : i + micro] for i in range(0, len(expected), micro)]
        assert [[row[0] for row in rows] for rows in epoch_plan.share(rank)] == expected


def test_grouping_and_packing_cut_the_padding():
    lengths = mixed_lengths(30)
    random = plan(lengths, "random", micro=8)
    grouped = plan(lengths, "grouped", micro=8)
    packed = plan(lengths, "packed", budget=8192)
    assert random.useful_share < 0.6 < 0.9 < grouped.useful_share
    assert packed.useful_share >= 0.95
    # The same tokens in all three: what changes is the padding around them.
    assert random.num_tokens == grouped.num_tokens == packed.num_tokens == lengths.sum()
    by_budget = plan(lengths, "grouped", budget=8192)
    assert by_budget.useful_share > 0.9
    assert by_budget.num_micro_batches < grouped.num_micro_batches  # short ones share


def test_grouped_micro_batches_hold_similar_lengths_in_a_shuffled_order():
    lengths = mixed_lengths(30)
    epoch_plan = plan(lengths, "grouped", micro=8)
    longest = [max(lengths[r[0]] for r in rows) for rows in epoch_plan.share(0)]
    assert longest != sorted(longest, reverse=True) and longest != sorted(longest)

    def padded_share(mode: str) -> float:  # positions that are padding
        batches = list(plan(lengths, mode, micro=8).share(0))
        positions = sum(len(rows) * max(lengths[r[0]] for r in rows) for rows in batches)
        return 1 - sum(lengths[r[0]] for rows in batches for r in rows) / positions

    assert padded_share("grouped") < padded_share("random") / 3


def test_a_budget_below_the_longest_example_names_the_flag():
    with pytest.raises(DstrainError, match=r"--tokens-per-micro-batch 1000 .* \(2048 codons\)"):
        plan(mixed_lengths(1), "grouped", budget=1000)
    with pytest.raises(DstrainError, match=r"--tokens-per-micro-batch 3000 .* --max-length 4096"):
        plan(np.array([5, 9]), "packed", budget=3000, max_length=4096)
    with pytest.raises(DstrainError, match="prepared with a larger --max-length"):
        plan(np.array([5, 90]), "packed", max_length=64)


def test_settings_refuse_contradictory_batching():
    with pytest.raises(ValueError, match=r"--loss-on-pad .* --batching packed"):
        DataSettings(batching="packed", loss_on_pad=True)
    with pytest.raises(ValueError, match=r"--tokens-per-micro-batch 1024 .* --max-length 2048"):
        DataSettings(batching="packed", tokens_per_micro_batch=1024)
    with pytest.raises(ValueError, match="--padding max_length pads every row"):
        DataSettings(padding="max_length", tokens_per_micro_batch=100, max_length=256)
    assert DataSettings(batching="grouped", tokens_per_micro_batch=100).batching == "grouped"


def test_run_plan_counts_the_planned_epochs():
    counts = {0: 10, 1: 12, 2: 9}
    run = plan_run(1, world=1, micro=1, accum=4, epochs=2.5, max_steps=None, epoch_micro=counts.get)
    assert run == RunPlan(micro_per_epoch=10, total_steps=(10 + 12 + 4) // 4, unused_tail=2)


@pytest.mark.parametrize("epoch_micro", [None, {0: 100, 1: 100}.get])
def test_run_plan_counts_fractional_epochs_without_float_loss(epoch_micro):
    """0.29 x 100 micro-batches is 28.999999999999996 in floating point: still 29."""
    run = plan_run(
        400, world=1, micro=4, accum=1, epochs=0.29, max_steps=None, epoch_micro=epoch_micro
    )
    assert run.total_steps == 29
    run = plan_run(
        400, world=1, micro=4, accum=1, epochs=1.29, max_steps=None, epoch_micro=epoch_micro
    )
    assert run.total_steps == 129
