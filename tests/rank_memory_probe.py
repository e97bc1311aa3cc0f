"""Count the bytes each DeepSpeed ZeRO rank really holds; run by tests/test_memory_engines.py.

    torchrun --nproc_per_node 2 tests/rank_memory_probe.py OUT_DIR 0:fp32 1:bf16 ... 3:bf16

Each CASE is `STAGE:PRECISION`. For each case, in order, every rank builds the same small
GPT-NeoX (fp32), hands it with a client `torch.optim.AdamW` (nothing JIT-compiled) to
`deepspeed.initialize`, trains two steps on a fixed batch, and snapshots the second step
(Adam's moments exist from the first) at:

- `before_reduce`: end of backward, before the gradient reduction (ZeRO-1 still holds
  every full gradient here);
- `after_backward`: `engine.backward` returned (gradients reduced and partitioned);
- `at_cast`: ZeRO-1/2 only, inside `step` right after the 16-bit gradient partition was
  cast to fp32 (see `_watch_gradient_cast`);
- `in_step`: inside the torch optimizer's `step`, right after Adam ran;
- `after_step`: `engine.step` returned (first step's snapshots are overwritten).

A snapshot walks the model's parameters (data, `.grad`, ZeRO-3's `ds_tensor`), the fp32
master tensors under their DeepSpeed names, the torch optimizer's param groups and state,
then every tensor reachable from `engine.optimizer` through DeepSpeed / torch.optim
objects, lists, tuples and dicts. Storages count once (views share them), in the category
of the first path that reaches them:

- `params_bytes`: parameters as trained (flat 16-bit buffer or fp32 params; ZeRO-3's
  partitions and its whole persistent parameters);
- `master_bytes`: the fp32 master copy (partition);
- `optimizer_state_bytes`: Adam's `exp_avg`, `exp_avg_sq`, `step`;
- `model_gradient_bytes`: gradients in the training dtype (per-parameter, partitions,
  flat copies);
- `master_gradient_bytes`: the fp32 gradients of the master copy;
- `buffer_bytes`: everything else the optimizer holds (gradient buckets).

The snapshots count what the engine holds at chosen points; they miss whatever lives
between them. Each case also records `peak_rss_bytes`: the kernel's resident-set
high-water mark (VmHWM, reset by writing "5" to /proc/self/clear_refs) over the second
step (the first also loads kernels and builds Adam's state), minus the resident set just
before the case built its model. It counts every page the step touched (model states,
activations, temporaries, allocator slack): a true peak, from above. Run with
MALLOC_MMAP_THRESHOLD_=65536 (the test does): glibc then returns every freed large block
to the kernel at once, so memory an earlier case freed cannot be reused unseen below the
baseline. torch keeps no CPU allocator statistics (torch.cpu has no memory_stats), hence
the kernel's figure.

Rank r writes `OUT_DIR/rank{r}.json`: {case: {"numel", "model", "ds_config", "optimizer",
"peak_rss_bytes", snapshots...}}. ZeRO-3 cases must come last (ZeRO-3 patches
torch.nn.functional.linear for the rest of the process). Set PROBE_DEBUG=1 to list every
storage with its path.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch

# ZeRO's gloo groups keep a 30-minute timeout unless this is set before they exist.
torch.distributed.distributed_c10d.default_pg_timeout = timedelta(seconds=60)

import deepspeed  # noqa: E402
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM  # noqa: E402

from dstrain.calibrate import reset_peak_rss, status_bytes  # noqa: E402

# The shm comm op is JIT-built (~35 s) at the first init_distributed unless turned off.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

MODEL = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 1024,
    "vocab_size": 69,
}
"""3,194,880 parameters: large beside the 100,000-element buckets."""
BUCKET_NUMEL = 100_000
SEQ_LEN = 16
MICRO_BATCH = 1

MASTER_ATTRIBUTES = (
    "single_partition_of_fp32_groups",  # ZeRO-1/2, runtime/zero/stage_1_and_2.py
    "fp32_partitioned_groups_flat",  # ZeRO-3, runtime/zero/stage3.py
    "fp32_groups_flat",  # stage 0 FP16_Optimizer, runtime/fp16/fused_optimizer.py
    "fp32_groups",  # stage 0 FP16_UnfusedOptimizer, runtime/fp16/unfused_optimizer.py
)
CATEGORIES = (
    "params_bytes",
    "master_bytes",
    "optimizer_state_bytes",
    "model_gradient_bytes",
    "master_gradient_bytes",
    "buffer_bytes",
)


def ds_config(stage: int, precision: str) -> dict:
    """The DeepSpeed config of one case (written out so the test estimates from it)."""
    zero: dict = {
        "stage": stage,
        "reduce_bucket_size": BUCKET_NUMEL,
        "allgather_bucket_size": BUCKET_NUMEL,
    }
    if stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=BUCKET_NUMEL,
            stage3_max_live_parameters=BUCKET_NUMEL,
            stage3_param_persistence_threshold=10_000,
        )
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": precision == "bf16"},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
    }


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that owns Adam's state (DeepSpeed wraps the client's)."""
    inner = engine.optimizer
    while not isinstance(inner, torch.optim.Optimizer) or hasattr(inner, "loss_scaler"):
        inner = inner.optimizer
    return inner


def snapshot(engine, extra: dict | None = None) -> dict:
    """Bytes per category of every distinct storage the engine's model and optimizer hold.

    `extra` maps a label to (category, tensor) for tensors only a local variable holds.
    """
    seen: dict[tuple[int, int], str] = {}
    items: list[str] = []
    visited: set[int] = set()

    def add(category: str, path: str, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.numel() == 0:
            return
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key[1] and key not in seen:
            seen[key] = category
            items.append(f"{category}: {path} {t.dtype} {key[1]}")

    for path, (category, t) in (extra or {}).items():
        add(category, path, t)
    for name, p in engine.module.named_parameters():
        add("params_bytes", name, p)
        add("params_bytes", f"{name}.ds_tensor", getattr(p, "ds_tensor", None))
        add("model_gradient_bytes", f"{name}.grad", p.grad)
        add("model_gradient_bytes", f"{name}.grad_accum", getattr(p, "grad_accum", None))
    # ZeRO-3 puts its fp32 partitions in the torch optimizer's param_groups only to step.
    for attr in MASTER_ATTRIBUTES:
        for i, master in enumerate(getattr(engine.optimizer, attr, None) or []):
            for j, t in enumerate(master if isinstance(master, (list, tuple)) else [master]):
                add("master_bytes", f"{attr}[{i}][{j}]", t)
                add("master_gradient_bytes", f"{attr}[{i}][{j}].grad", t.grad)
    inner = _inner_optimizer(engine)
    for g, group in enumerate(inner.param_groups):
        for i, master in enumerate(group["params"]):
            add("master_bytes", f"param_groups[{g}][{i}]", master)
            add("master_gradient_bytes", f"param_groups[{g}][{i}].grad", master.grad)
    for state in inner.state.values():
        for key, value in state.items():
            add("optimizer_state_bytes", f"state[.][{key}]", value)

    def walk(obj, path: str, depth: int) -> None:
        if depth > 12 or id(obj) in visited:
            return
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            leaf = path.rsplit(".", 1)[-1].lower()
            add("model_gradient_bytes" if "grad" in leaf else "buffer_bytes", path, obj)
            if obj.grad is not None:
                add("model_gradient_bytes", path + ".grad", obj.grad)
            walk(getattr(obj, "ds_tensor", None), path + ".ds_tensor", depth + 1)
        elif isinstance(obj, torch.nn.Module):
            return  # the model was walked above
        elif isinstance(obj, dict):
            for k, v in list(obj.items()):
                walk(k, f"{path}[key]", depth + 1)
                walk(v, path, depth + 1)
        elif isinstance(obj, (list, tuple, set)):
            for v in obj:
                walk(v, path, depth + 1)
        elif type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(
            obj, "__dict__"
        ):
            for k, v in vars(obj).items():
                walk(v, f"{path}.{k}", depth + 1)

    walk(engine.optimizer, "optimizer", 0)
    out = dict.fromkeys(CATEGORIES, 0)
    for (_, nbytes), category in seen.items():
        out[category] += nbytes
    if os.environ.get("PROBE_DEBUG"):
        out["items"] = sorted(items)
    return out


def _watch_gradient_cast(engine, probe: dict) -> None:
    """Count the short-lived copies a ZeRO optimizer makes when it casts gradients to fp32.

    The model-state peak of a step is `self.flatten(averaged_gradients[i]).to(fp32)` in
    `step` (stage_1_and_2.py) and `_prepare_fp32_grad_for_sub_group` (stage3.py):
    `averaged_gradients` is a list of views, so `flatten` copies them, and the copy lives
    until the cast is done, beside the fp32 result, the master and both moments. `flatten`
    is wrapped to keep what it returns during `step`; the next snapshot counts it:

    - ZeRO-1/2: `self._muon_update_lacks_loss_scale(i)` runs right after the cast, while
      `averaged_gradients[i]` still holds the 16-bit partition; the fp32 result is read
      from the calling frame (`single_grad_partition`);
    - ZeRO-3: the in-step snapshot still sees the fp32 gradient as the master's `.grad`.
    """
    optimizer = engine.optimizer
    flatten = optimizer.flatten

    def flatten_and_keep(tensors):
        flat = flatten(tensors)
        if probe["stepping"]:
            probe["flats"].append(flat)
        return flat

    optimizer.flatten = flatten_and_keep
    if not hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-1/2
        lacks_loss_scale = optimizer._muon_update_lacks_loss_scale

        def measure_cast(i):
            extra = _kept_flats(probe)
            fp32_grad = sys._getframe(1).f_locals.get("single_grad_partition")
            extra["single_grad_partition"] = ("master_gradient_bytes", fp32_grad)
            probe["snapshots"]["at_cast"] = snapshot(engine, extra)
            return lacks_loss_scale(i)

        optimizer._muon_update_lacks_loss_scale = measure_cast


def _kept_flats(probe: dict) -> dict:
    flats, probe["flats"] = probe["flats"], []
    return {f"flatten[{i}]": ("model_gradient_bytes", t) for i, t in enumerate(flats)}


def run_case(stage: int, precision: str) -> dict:
    """Two training steps of one case; the snapshots of the second."""
    gc.collect()
    baseline_rss = status_bytes("VmRSS")
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        **MODEL, max_position_embeddings=64, tie_word_embeddings=False, use_cache=False
    )
    model = GPTNeoXForCausalLM(config).to(torch.float32)
    numel = sum(p.numel() for p in model.parameters())
    client = torch.optim.AdamW(model.parameters(), lr=1e-4)
    config_dict = ds_config(stage, precision)
    engine, *_ = deepspeed.initialize(model=model, optimizer=client, config=config_dict)
    probe: dict = {"stepping": False, "flats": [], "snapshots": {}}
    snaps = probe["snapshots"]

    inner = _inner_optimizer(engine)
    adam_step = inner.step

    def step_and_measure(*args, **kwargs):
        out = adam_step(*args, **kwargs)
        snaps["in_step"] = snapshot(engine, _kept_flats(probe))
        return out

    inner.step = step_and_measure
    epilogue = engine._backward_epilogue

    def measure_and_epilogue(*args, **kwargs):
        snaps["before_reduce"] = snapshot(engine)
        return epilogue(*args, **kwargs)

    engine._backward_epilogue = measure_and_epilogue
    if stage > 0:
        _watch_gradient_cast(engine, probe)

    ids = torch.arange(SEQ_LEN * MICRO_BATCH).remainder(MODEL["vocab_size"])
    ids = ids.view(MICRO_BATCH, SEQ_LEN)
    peak_rss = 0
    for _ in range(2):
        reset_peak_rss()
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        snaps["after_backward"] = snapshot(engine)
        probe["stepping"] = True
        engine.step()
        probe["stepping"] = False
        probe["flats"].clear()
        snaps["after_step"] = snapshot(engine)
        peak_rss = status_bytes("VmHWM")  # the second step's, like the snapshots

    result = {
        "numel": numel,
        "model": MODEL,
        "seq_len": SEQ_LEN,
        "ds_config": config_dict,
        "optimizer": type(engine.optimizer).__name__,
        "peak_rss_bytes": peak_rss - baseline_rss,
        "snapshots": snaps,
    }
    engine.destroy()
    return result


def main() -> None:
    out_dir = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    for case in sys.argv[2:]:
        stage, precision = case.split(":")
        results[case] = run_case(int(stage), precision)
        gc.collect()  # the previous engine (a reference cycle through the wrapped methods)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
