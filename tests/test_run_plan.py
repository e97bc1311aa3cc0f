"""The run plan, the loop state and the throughput window: pure values, no engine."""

from __future__ import annotations

import dataclasses

import pytest

from dstrain.errors import DstrainError
from dstrain.train import LoopState, RunPlan, ThroughputWindow, epoch_batches, plan_run


def plan(num_examples, world=1, micro=1, accum=1, epochs=1.0, max_steps=None) -> RunPlan:
    return plan_run(
        num_examples, world=world, micro=micro, accum=accum, epochs=epochs, max_steps=max_steps
    )


def test_epochs_make_whole_windows_and_name_the_tail():
    # 96 examples / 2 ranks / micro 4 = 12 micro-batches per epoch per rank;
    # 2.5 epochs = 30 micro-batches = 7 windows of 4, 2 left over.
    assert plan(96, world=2, micro=4, accum=4, epochs=2.5) == RunPlan(
        micro_per_epoch=12, total_steps=7, unused_tail=2
    )
    assert plan(96, world=2, micro=4, accum=4, epochs=3) == RunPlan(12, 9, 0)


def test_uneven_shares_round_up_like_the_sampler():
    # 50 examples on 4 ranks: the sampler pads each share to 13, micro 4 -> 4 micro-batches.
    assert plan(50, world=4, micro=4, accum=3).micro_per_epoch == 4
    assert plan(50, world=4, micro=4, accum=3) == RunPlan(4, 1, 1)


@pytest.mark.parametrize(
    ("num_examples", "world", "micro"), [(1, 1, 1), (7, 2, 3), (50, 4, 4), (48, 3, 5), (5, 8, 2)]
)
def test_micro_per_epoch_is_the_length_of_each_ranks_stream(num_examples, world, micro):
    expected = plan(num_examples, world=world, micro=micro).micro_per_epoch
    for rank in range(world):
        assert len(epoch_batches(num_examples, micro, 0, 0, rank, world)) == expected


def test_max_steps_overrides_epochs_and_leaves_no_tail():
    assert plan(10, micro=4, accum=8, epochs=0.1, max_steps=25) == RunPlan(3, 25, 0)


def test_no_optimizer_step_is_an_error_with_the_numbers():
    with pytest.raises(DstrainError) as info:
        plan(10, world=2, micro=2, accum=8, epochs=1)
    message = str(info.value)
    assert message.startswith("no optimizer step would run: 1 epoch(s) give 3 micro-batch(es)")
    assert "(10 examples / 2 ranks / micro batch 2)" in message
    assert "gradient_accumulation_steps is 8" in message and "Raise --epochs" in message


def test_the_plan_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan(10).total_steps = 1


def test_loop_state_saves_as_the_same_dict():
    """Checkpoints keep the loop as a plain dict under these keys: older ones must load."""
    saved = {
        "epoch": 2,
        "micro_in_epoch": 5,
        "samples_seen": 80,
        "tokens_seen": 9000,
        "useful_tokens_seen": 8000,
        "best_val_loss": 3.5,
        "last_val_loss": 3.75,
    }
    assert list(LoopState().to_dict()) == list(saved)
    assert LoopState.from_dict(saved).to_dict() == saved
    partial = LoopState.from_dict({"epoch": 1, "unknown": "ignored"})
    assert partial == LoopState(epoch=1)


def test_throughput_window_adds_and_sums_over_ranks():
    window = ThroughputWindow(started=100.0)
    window.add(2.0, num_tokens=64, num_real_tokens=50, num_samples=4)
    window.add(3.0, num_tokens=32, num_real_tokens=30, num_samples=2)
    assert (window.loss_sum, window.micro_batches, window.tokens) == (5.0, 2, 96)
    assert (window.real_tokens, window.samples) == (80, 6)

    seen = []

    def two_ranks(values):  # the other rank did the same work
        seen.append(list(values))
        return [2.0 * v for v in values]

    total = window.summed_over_ranks(two_ranks)
    assert seen == [[5.0, 2, 96, 80, 6]]  # one collective, in field order
    assert total == ThroughputWindow(10.0, 4, 192, 160, 12, started=100.0)
    assert window.micro_batches == 2  # this rank's window is unchanged


def test_the_trainer_is_built_in_init():
    """Every Trainer attribute is first set in __init__; other methods only update them."""
    import ast
    import inspect

    from dstrain.train import Trainer

    tree = ast.parse(inspect.getsource(Trainer))
    assigned: dict[str, set[str]] = {}
    for method in tree.body[0].body:
        if not isinstance(method, ast.FunctionDef):
            continue
        for node in ast.walk(method):
            targets = getattr(node, "targets", None) or [getattr(node, "target", None)]
            for target in (t for top in targets if top for t in ast.walk(top)):
                if (
                    isinstance(target, ast.Attribute)
                    and isinstance(target.value, ast.Name)
                    and target.value.id == "self"
                ):
                    assigned.setdefault(method.name, set()).add(target.attr)
    built = assigned.pop("__init__")
    later = {name: attrs - built for name, attrs in assigned.items() if attrs - built}
    assert later == {}
    assert {"engine", "plan", "loop", "start_step", "window", "metrics", "bar"} <= built


def test_an_accumulation_spanning_over_1000_epochs_is_refused_not_run_forever():
    # 12 examples, micro 4: 3 micro-batches per epoch. Accumulation spanning epochs is
    # legitimate (tiny data), but 2**63-1 made one optimizer step run for ever, silently.
    assert plan(12, micro=4, accum=3000, max_steps=1).total_steps == 1
    for accum, max_steps in ((3001, 1), (2**63 - 1, 1), (2**63 - 1, None)):
        with pytest.raises(DstrainError, match="gradient_accumulation_steps") as info:
            plan(12, micro=4, accum=accum, max_steps=max_steps)
        assert "--grad-accum" in str(info.value)
