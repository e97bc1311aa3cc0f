"""Exact packing: several examples per row behave as if each ran alone.

`PackedCollator` lays whole examples end to end with position ids restarting at each one
and no attention mask, so transformers confines attention to each example. Checked
against the same examples run alone and in a padded `CodonCollator` batch: logits,
per-example losses, the micro-batch loss and gradients, for `sdpa` and `eager`, and once
through a real DeepSpeed engine.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dstrain.batching import (
    IGNORE_INDEX,
    CodonCollator,
    CodonDataset,
    PackedCollator,
    count_examples,
    count_tokens,
)
from dstrain.codons import PAD_ID
from dstrain.errors import DstrainError
from dstrain.fasta import bundled_fasta_paths
from dstrain.prepare import prepare_dataset
from dstrain.settings import DataSettings

LENGTHS = [[23, 48, 1, 9], [31, 17]]
"""Codons of the examples in each packed row: an example of one codon (nothing to
predict), a full row, and a short row that gets a padding tail."""


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """Prefixes of real H3N2 windows (prepared with max_length=48), laid out as LENGTHS."""
    cache = tmp_path_factory.mktemp("packing") / "cache"
    prepared = prepare_dataset(bundled_fasta_paths(), cache, DataSettings(max_length=48))
    dataset = CodonDataset(prepared.train)
    windows = iter(dataset[i] for i in range(len(dataset)) if len(dataset[i]) == 48)
    return [[next(windows)[:n] for n in row] for row in LENGTHS]


@pytest.fixture(scope="module")
def model():
    from dstrain.model import build_model

    torch.manual_seed(0)
    return build_model("genslm_tiny").eval()


@pytest.fixture(params=["sdpa", "eager"])
def attn_model(request, model):
    model.set_attn_implementation(request.param)
    yield model
    model.set_attn_implementation("sdpa")


def _segments(rows):
    """(row, start, example) for every example of a packed batch."""
    for r, row in enumerate(rows):
        start = 0
        for example in row:
            yield r, start, example
            start += len(example)


def _summed_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum of next-token losses of one example from its own logits (length, vocab)."""
    return F.cross_entropy(logits[:-1].float(), ids[1:], reduction="sum")


def test_packed_layout(rows):
    batch = PackedCollator(max_length=96)(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert all(t.shape == (2, 81) and t.dtype == torch.long for t in batch.values())
    ids, labels, positions = batch["input_ids"], batch["labels"], batch["position_ids"]
    for r, start, example in _segments(rows):
        n = len(example)
        assert torch.equal(ids[r, start : start + n], example)
        assert positions[r, start : start + n].tolist() == list(range(n))
        assert labels[r, start] == IGNORE_INDEX  # no example predicts across a join
        assert torch.equal(labels[r, start + 1 : start + n], example[1:])
    assert (ids[1, 48:] == PAD_ID).all() and (labels[1, 48:] == IGNORE_INDEX).all()
    assert positions[1, 48:].tolist() == list(range(33))  # the tail is a segment of its own
    assert count_tokens(batch) == (2 * 81, 81 + 48)
    assert count_examples(batch) == 6
    padded = CodonCollator()([e for row in rows for e in row])
    assert count_examples(padded) == 6
    assert (labels != IGNORE_INDEX).sum() == (padded["labels"][:, 1:] != IGNORE_INDEX).sum()

    fixed = PackedCollator.from_settings(DataSettings(max_length=96, padding="max_length"))
    assert fixed(rows)["input_ids"].shape == (2, 96)


def test_refusals(rows):
    with pytest.raises(DstrainError, match=r"81 codons, over the row capacity max_length=80"):
        PackedCollator(max_length=80)(rows)
    with pytest.raises(DstrainError, match="--loss-on-pad"):
        PackedCollator.from_settings(DataSettings(loss_on_pad=True))
    with pytest.raises(DstrainError, match=r"\[PAD\]"):
        PackedCollator()([[torch.tensor([5, PAD_ID, 6])]])
    with pytest.raises(DstrainError, match="every row"):
        PackedCollator()([[rows[0][0]], []])


def test_packed_equals_alone_and_padded(attn_model, rows):
    batch = PackedCollator(max_length=96)(rows)
    with torch.no_grad():
        out = attn_model(**batch, use_cache=False)
        for r, start, example in _segments(rows):
            alone = attn_model(input_ids=example[None], use_cache=False).logits[0]
            packed = out.logits[r, start : start + len(example)]
            torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)
            if len(example) > 1:
                mean = _summed_token_loss(packed, example) / (len(example) - 1)
                single = attn_model(input_ids=example[None], labels=example[None]).loss
                assert abs(mean.item() - single.item()) < 1e-5
        padded = CodonCollator()([e for row in rows for e in row])
        padded_loss = attn_model(**padded, use_cache=False).loss
    assert abs(out.loss.item() - padded_loss.item()) < 1e-5


def test_packed_gradients_equal_the_sum_of_alone_gradients(attn_model, rows):
    """The gradient of the model's own loss on a packed batch (the mean over its predicted
    tokens, what training backpropagates) equals the sum of each example's summed token
    loss gradient, run alone, over the same token count."""
    params = [p for p in attn_model.parameters() if p.requires_grad]
    batch = PackedCollator(max_length=96)(rows)
    packed = torch.autograd.grad(attn_model(**batch, use_cache=False).loss, params)

    alone = [torch.zeros_like(p) for p in params]
    num_predicted = sum(len(e) - 1 for _, _, e in _segments(rows))
    for _, _, example in _segments(rows):
        logits = attn_model(input_ids=example[None], use_cache=False).logits[0]
        loss = _summed_token_loss(logits, example) / num_predicted
        for total, grad in zip(alone, torch.autograd.grad(loss, params), strict=True):
            total += grad
    worst = max((a - b).abs().max().item() for a, b in zip(packed, alone, strict=True))
    largest = max(g.abs().max().item() for g in alone)
    assert worst < 1e-5 and largest > 1e-2, (worst, largest)


@torch.no_grad()
def test_no_attention_or_positions_across_joins(attn_model, rows):
    """Changing the first example of a row leaves the next one's logits as they were; a
    batch whose positions do not restart, or whose 2-D attention mask switches off
    transformers' segment detection, fails the same check (so it can fail)."""
    first, second = rows[1]
    collate = PackedCollator(max_length=96)
    base = collate([[first, second]])
    changed = collate([[torch.flip(first, [0]), second]])

    def second_logits(batch, **extra):
        return attn_model(**batch, **extra, use_cache=False).logits[0, len(first) :]

    alone = attn_model(input_ids=second[None], use_cache=False).logits[0]
    torch.testing.assert_close(second_logits(base), second_logits(changed), rtol=0, atol=1e-6)
    torch.testing.assert_close(second_logits(base), alone, rtol=0, atol=1e-5)

    no_restart = dict(base, position_ids=torch.arange(base["input_ids"].shape[1])[None])
    assert not torch.allclose(second_logits(no_restart), alone, atol=1e-3)
    ones = torch.ones_like(base["input_ids"])
    leaked = second_logits(base, attention_mask=ones)
    assert not torch.allclose(leaked, second_logits(changed, attention_mask=ones), atol=1e-3)


@pytest.mark.slow
def test_deepspeed_engine_packed_loss_and_steps_match_padded(rows):
    """Through `deepspeed.initialize` (1 rank, ZeRO-2, fp32): a packed batch gives the plain
    model's loss, and two engines from the same weights, one fed packed and one padded
    batches of the same examples, keep the same loss over a few Adam steps."""
    import copy

    import deepspeed

    from dstrain.ds_config import build_ds_config
    from dstrain.ds_runtime import prepare_deepspeed
    from dstrain.model import build_model
    from dstrain.settings import make_deepspeed_settings

    prepare_deepspeed(timeout_s=120)
    config = build_ds_config(
        make_deepspeed_settings(
            {
                "precision": "fp32",
                "zero_optimization": {"stage": 2},
                "batch": {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1},
                "optimizer": {"lr": 1e-3, "torch_adam": True},  # no FusedAdam JIT build on CPU
                "scheduler": {"type": "none"},
                "steps_per_print": 1000,
            }
        )
    )
    torch.manual_seed(0)
    plain = build_model("genslm_tiny")
    engines = []
    for model in (copy.deepcopy(plain), copy.deepcopy(plain)):
        engine, *_ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=config
        )
        engines.append(engine)
    packed_engine, padded_engine = engines
    packed = PackedCollator(max_length=96)(rows)
    padded = CodonCollator()([e for row in rows for e in row])
    with torch.no_grad():
        reference = plain(**padded, use_cache=False).loss.item()
        assert abs(packed_engine(**packed, use_cache=False).loss.item() - reference) < 1e-5

    curves = {"packed": [], "padded": []}
    for _ in range(3):
        for name, engine, batch in [
            ("packed", packed_engine, packed),
            ("padded", padded_engine, padded),
        ]:
            loss = engine(**batch, use_cache=False).loss
            engine.backward(loss)
            engine.step()
            curves[name].append(loss.item())
    assert curves["padded"][-1] < curves["padded"][0]  # it trains
    assert max(abs(a - b) for a, b in zip(*curves.values(), strict=True)) < 1e-5, curves
