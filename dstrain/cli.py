"""The `dstrain` command line.

Each command is a thin shell over one function: parse flags, call, print. This module
imports only click and dstrain's pure (L0) modules at top level; commands that need torch,
transformers or deepspeed import them inside their body, so `dstrain --help`,
`gen-config`, `estimate` and `validate --no-deepspeed` stay fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from dstrain import __version__
from dstrain.errors import DstrainError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="dstrain")
def cli() -> None:
    """Fine-tune GenSLM genome language models with DeepSpeed ZeRO."""


# --------------------------------------------------------------------------------------
# gen-config: settings -> DeepSpeed JSON
# --------------------------------------------------------------------------------------


class SettingsCommand(click.Command):
    """A command whose options generated from the settings fields (`dstrain.cli_options`)
    are made on first use, so listing the commands (`dstrain --help`) imports no pydantic."""

    def __init__(self, *args, generated: Callable[[], list[click.Parameter]], **kwargs):
        self._generate = generated
        self._all_params: list[click.Parameter] | None = None
        super().__init__(*args, **kwargs)

    @property
    def params(self) -> list[click.Parameter]:
        if self._all_params is None:  # one list object: click appends and pops on it
            self._all_params = [*self._own_params, *self._generate()]
        return self._all_params

    @params.setter
    def params(self, value: list[click.Parameter]) -> None:
        self._own_params, self._all_params = list(value), None


def _deepspeed_options() -> list[click.Parameter]:
    from dstrain.cli_options import click_params, deepspeed_specs

    return click_params(deepspeed_specs())


def _data_options() -> list[click.Parameter]:
    from dstrain.cli_options import click_params, data_specs

    return click_params(data_specs())


@cli.command("gen-config", cls=SettingsCommand, generated=_deepspeed_options)
@click.option(
    "--settings",
    "settings_file",
    type=click.Path(dir_okay=False),
    help="Start from a settings file (JSON, or TOML on Python 3.11+); flags override it.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    help="Write the JSON here (atomically) instead of stdout.",
)
def gen_config(settings_file: str | None, output: str | None, **flags) -> None:
    """Write a DeepSpeed JSON config from typed, validated settings.

    \b
    Examples:
      dstrain gen-config --zero 2 --bf16
      dstrain gen-config --zero 3 --fp16 --loss-scale-window 500 --initial-scale-power 12
      dstrain gen-config --micro-batch 4 --grad-accum 8 --offload-optimizer cpu -o ds.json
    """
    from dstrain.cli_options import deepspeed_specs, ds_config_from_flags
    from dstrain.ds_config import render_ds_config, write_text_atomic
    from dstrain.settings import read_settings_file

    base = read_settings_file(settings_file) if settings_file else {}
    source = settings_file or "flags"
    config, warnings = ds_config_from_flags(deepspeed_specs(), flags, base, source)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    text = render_ds_config(config)
    if output:
        write_text_atomic(output, text)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


# --------------------------------------------------------------------------------------
# validate: any DeepSpeed JSON
# --------------------------------------------------------------------------------------


@cli.command()
@click.argument("paths", nargs=-1, required=True)
@click.option(
    "--world-size",
    type=click.IntRange(min=1),
    help="Data-parallel ranks, for the batch arithmetic.",
)
@click.option(
    "--hostfile",
    type=click.Path(dir_okay=False),
    help="DeepSpeed hostfile; the world size is the sum of its slots.",
)
@click.option("--allow-auto", is_flag=True, help='Accept "auto" values (HF Trainer fills them).')
@click.option("--json", "as_json", is_flag=True, help="Print the problems as a JSON list.")
@click.option(
    "--no-deepspeed", is_flag=True, help="Skip DeepSpeed's own parser (no deepspeed import; fast)."
)
def validate(
    paths: tuple[str, ...],
    world_size: int | None,
    hostfile: str | None,
    allow_auto: bool,
    as_json: bool,
    no_deepspeed: bool,
) -> None:
    """Check DeepSpeed JSON configs strictly; `-` reads stdin.

    Reports every problem at once with its file and JSON path: unknown keys (with a
    did-you-mean), leftover "auto", settings DeepSpeed ignores silently, batch arithmetic
    for the real world size, then DeepSpeed's own parser (its complaint is always shown).
    Warnings and notes (such as `_comment` keys) never fail. Exit 0 valid, 1 invalid, 2 usage.
    """
    import json

    from dstrain.ds_check import validate_file
    from dstrain.hostfile import world_size_from_hostfile

    if world_size is not None and hostfile is not None:
        raise click.UsageError("give --world-size or --hostfile, not both")
    if hostfile is not None:
        try:
            world_size = world_size_from_hostfile(hostfile)
        except DstrainError as exc:
            raise DstrainError(str(exc), exit_code=2) from None
    problems = []
    for path in paths:
        problems += validate_file(
            path, world_size=world_size, allow_auto=allow_auto, use_deepspeed=not no_deepspeed
        )
    errors = [p for p in problems if p.severity == "error"]
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in problems], indent=2))
    else:
        for problem in problems:
            click.echo(problem.format())
        bad = {p.file for p in errors}
        for path in paths:
            name = "<stdin>" if path == "-" else path
            if name not in bad:
                click.echo(f"{name}: OK")
        if errors:
            click.echo(f"{len(errors)} error(s) in {len(bad)} file(s)", err=True)
    if errors:
        raise click.exceptions.Exit(1)


@cli.command("convert-checkpoint")
@click.argument("checkpoint", type=click.Path(dir_okay=True))
@click.option(
    "--model",
    "model_name",
    required=True,
    help="Architecture of the checkpoint: a registered name (genslm_25M, genslm_250M, "
    "genslm_2.5B, ...) or a GPT-NeoX config.json.",
)
@click.option(
    "-o",
    "--output",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="HF model directory to write (safetensors + config.json + codon tokenizer).",
)
@click.option(
    "--trust-checkpoint",
    is_flag=True,
    help="Allow full unpickling of CHECKPOINT, which can run code hidden in the file. "
    "Official GenSLM .pt files and upstream DeepSpeed checkpoint directories need it; use "
    "only for files from a source you trust.",
)
@click.option(
    "--overwrite", is_flag=True, help="Replace OUTPUT if it is an existing model directory."
)
def convert_checkpoint_command(
    checkpoint: str, model_name: str, out_dir: str, trust_checkpoint: bool, overwrite: bool
) -> None:
    """Convert an official GenSLM checkpoint into an HF model directory.

    CHECKPOINT is a .pt file, an HF model directory, or a DeepSpeed checkpoint directory
    from upstream GenSLM's training (`NAME.ckpt/` with `latest` and
    `checkpoint/*_states.pt`, consolidated with DeepSpeed's zero_to_fp32; needs
    --trust-checkpoint). A dstrain run is exported with `dstrain export` instead.

    The result loads with `AutoModelForCausalLM.from_pretrained(OUTPUT)` and serves as
    an initial checkpoint for training. Every tensor is checked: a checkpoint of another
    size fails with the tensors that differ.
    """
    from dstrain.model import convert_checkpoint

    result = convert_checkpoint(
        checkpoint, model_name, out_dir, trust_checkpoint=trust_checkpoint, overwrite=overwrite
    )
    click.echo(
        f"wrote {result.out_dir} ({result.architecture.name}, {result.num_params:,} parameters, "
        f"fp32 safetensors + codon tokenizer)"
    )


# --------------------------------------------------------------------------------------
# prepare: FASTA -> codon token cache
# --------------------------------------------------------------------------------------


@cli.command("prepare", cls=SettingsCommand, generated=_data_options)
@click.argument("fasta", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(),
    help="Cache directory to write (replaced as a whole; reused when it matches).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the report as JSON on stdout (totals, splits, per file).",
)
def prepare_command(fasta: tuple[str, ...], output: str, as_json: bool, **options) -> None:
    """Tokenize nucleotide FASTA files (plain or .gz) into a reusable codon token cache.

    Reports records, codons, [UNK] codons, partial codons (dropped or [UNK]), gaps removed,
    U read as T, and skipped records per file. A second run with the same files and options reuses the cache.

    \b
    Examples:
      dstrain prepare genes.fasta -o runs/cache
      dstrain prepare a.fasta.gz b.fasta -o runs/cache --frame orf --json
    """
    import time
    from pathlib import Path

    from dstrain.prepare import (
        data_settings_from_options,
        format_summary,
        prepare_dataset,
        report_json,
    )

    settings = data_settings_from_options(**options)
    start = time.perf_counter()
    prepared = prepare_dataset([Path(p) for p in fasta], Path(output), settings)
    if as_json:
        click.echo(report_json(prepared), nl=False)
    else:
        click.echo(format_summary(prepared, time.perf_counter() - start))


# --------------------------------------------------------------------------------------
# train / export: the engine loop and its checkpoints
# --------------------------------------------------------------------------------------


@cli.command(
    "train",
    context_settings={
        "ignore_unknown_options": True,
        "allow_extra_args": True,
        "help_option_names": [],
    },
    add_help_option=False,
)
@click.pass_context
def train_command(ctx: click.Context) -> None:
    """Fine-tune a GenSLM model with DeepSpeed (`dstrain train --help` lists the options).

    With no arguments: genslm_tiny on the bundled H3N2 HA/NA set (CPU if no GPU).
    `--num-gpus N` or `--hostfile H` hands off to the deepspeed launcher.
    """
    from dstrain.train import main as train_main

    code = train_main(list(ctx.args))
    if code:
        raise click.exceptions.Exit(code)


@cli.command("export")
@click.argument("checkpoint", type=click.Path())
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(file_okay=False),
    help="HF model directory to write (safetensors + config + codon tokenizer).",
)
@click.option(
    "--pt", "export_pt", is_flag=True, help="Also write pytorch_model.pt (a plain fp32 state_dict)."
)
@click.option(
    "--format",
    "export_format",
    type=click.Choice(["hf", "upstream"]),
    default="hf",
    show_default=True,
    help="hf: the HF model directory. upstream: the same directory plus genslm_upstream.pt, "
    'the {"state_dict": ...} file upstream\'s genslm.GenSLM class loads (transformers 4.21 '
    "names: embed_out head, attention buffers).",
)
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option(
    "--trust-checkpoint",
    is_flag=True,
    help="Export a checkpoint that has no dstrain_manifest.json (one from an older dstrain) "
    "and unpickle it in full. Unpickling can run code hidden in a file: only for "
    "checkpoints from a source you trust. Without it every file is checked against the "
    "manifest's sha256 and loaded tensors-only first.",
)
def export_command(
    checkpoint: str,
    output: str,
    export_pt: bool,
    export_format: str,
    overwrite: bool,
    trust_checkpoint: bool,
) -> None:
    """Consolidate a dstrain checkpoint (any ZeRO stage) into an HF model directory.

    CHECKPOINT is a run's output directory, its checkpoints/ directory, or one step
    directory in it.
    """
    from dstrain.export import export_checkpoint

    result = export_checkpoint(
        checkpoint,
        output,
        export_pt=export_pt,
        export_format=export_format,
        overwrite=overwrite,
        trust_checkpoint=trust_checkpoint,
    )
    step = f" at step {result.step}" if result.step is not None else ""
    click.echo(
        f"wrote {result.out_dir}: {result.architecture}, {result.num_params:,} "
        f"parameters{step} (load with AutoModelForCausalLM.from_pretrained)"
    )
    if export_format == "upstream":
        click.echo(
            f"wrote {result.out_dir}/genslm_upstream.pt (upstream GenSLM's layout: "
            'torch.load(path)["state_dict"] into a transformers 4.2x GPTNeoXForCausalLM)'
        )


@cli.group("checkpoint")
def checkpoint_group() -> None:
    """Work on a dstrain run's DeepSpeed checkpoints."""


@checkpoint_group.command("reshape")
@click.argument("checkpoint", type=click.Path())
@click.option(
    "--trust-checkpoint",
    is_flag=True,
    help="Convert a checkpoint that has no dstrain_manifest.json (one from an older dstrain). "
    "The conversion unpickles it in full, which can run code hidden in a file: only for "
    "checkpoints from a source you trust.",
)
def checkpoint_reshape_command(checkpoint: str, trust_checkpoint: bool) -> None:
    """Convert a checkpoint for a resume on another number of GPUs.

    CHECKPOINT is a run's output directory, its checkpoints/ directory, or one step
    directory in it. The tag is verified against its manifest, then converted by
    DeepSpeed's ds_to_universal into TAG.universal beside it: the copy `--resume` makes
    (and reuses) by itself when the world size changed, done ahead of time. ZeRO-0
    checkpoints need no conversion and are refused.
    """
    import json
    import os

    import torch

    if not torch.cuda.is_available():  # DeepSpeed's accelerator warning stays off stdout
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from dstrain.checkpoints import MANIFEST_NAME, resolve_checkpoint, universal_checkpoint

    ckpt_dir, tag = resolve_checkpoint(checkpoint)
    path, made = universal_checkpoint(ckpt_dir, tag, trust=trust_checkpoint, verified=False)
    world = json.loads((path / MANIFEST_NAME).read_text()).get("world_size")
    written = f", written by {world} rank(s)" if isinstance(world, int) and world > 0 else ""
    click.echo(
        f"{'wrote' if made else 'reused'} {path}: the universal checkpoint of "
        f"{ckpt_dir / tag}{written}. `dstrain train --resume auto` (or --resume "
        f"{ckpt_dir / tag}) loads it on any number of ranks with the same global batch."
    )


@cli.command("report")
@click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR [RUN_DIR...]")
@click.option(
    "--compare",
    "compare",
    multiple=True,
    metavar="RUN_DIR",
    help="Overlay another run (repeatable; run directories after it are overlaid too).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    help="report.png (.svg, .pdf), or report.html: the PNG and a summary table in one page. "
    "Default RUN_DIR/report.png (RUN_DIR/report-compare.png with several runs).",
)
def report_command(run_dirs: tuple[str, ...], compare: tuple[str, ...], output: str | None) -> None:
    """Plot a training run: loss (raw, smoothed, validation), perplexity, learning rate,
    fp16 loss scale with skipped steps, throughput and memory, against step.

    Reads RUN_DIR/metrics.jsonl (a run in progress too; a resumed run is one curve).

    \b
    Examples:
      dstrain report runs/ha
      dstrain report runs/zero2 --compare runs/zero3 -o zero2-vs-3.html
    """
    from dstrain.report import default_output, write_report

    runs = [*run_dirs, *compare]
    target = output or default_output(runs)
    report = write_report(runs, target)
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    steps = ", ".join(f"{run.label} step {run.last_step}" for run in report.runs)
    click.echo(f"wrote {target} ({len(report.panels)} panels; {steps})")


# --------------------------------------------------------------------------------------
# generate: sample codon sequences from a trained model
# --------------------------------------------------------------------------------------


@cli.command("generate")
@click.argument("model_spec", metavar="MODEL")
@click.option("-n", "--num-seqs", "n", type=int, required=True, help="Sequences to write.")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="FASTA file to write (atomically); headers carry the seed and the record's index.",
)
@click.option(
    "--prompt",
    default="ATG",
    show_default=True,
    help="DNA every record starts with: A/C/G/T, whole codons (upstream's start, ATG, by "
    "default). '' starts from the bos token as upstream's unprompted generation does (it "
    "counts in --max-length, as upstream counts it).",
)
@click.option(
    "--max-length",
    type=int,
    default=512,
    show_default=True,
    help="Codons per record, the prompt included (as upstream's max_length); every record "
    "has exactly this many unless --to-stop-codon cuts it. At most the context (2048).",
)
@click.option("--top-k", type=int, default=50, show_default=True, help="0 turns it off.")
@click.option("--top-p", type=float, default=0.95, show_default=True, help="1 turns it off.")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Same seed and flags -> the same FASTA, byte for byte (on the same device and dtype).",
)
@click.option(
    "--batch-size",
    type=int,
    default=8,
    show_default=True,
    help="Sequences sampled together. Part of the recipe: another batch size gives other records.",
)
@click.option(
    "--to-stop-codon",
    is_flag=True,
    help="Cut each record after its first in-frame stop codon (kept), as upstream's "
    "tokens_to_sequences does.",
)
@click.option(
    "--translate",
    is_flag=True,
    help="Also write the proteins (biopython's translate, standard table, stops as *) to "
    "OUTPUT with suffix .faa, same headers.",
)
@click.option(
    "--unique-against",
    "known_files",
    multiple=True,
    type=click.Path(dir_okay=False),
    metavar="KNOWN.fasta",
    help="Repeatable. Keep sampling until -n records are neither in these FASTA files nor "
    "repeats of each other (compared as written: upper case, after any cut).",
)
@click.option(
    "--max-rounds",
    type=int,
    default=100,
    show_default=True,
    help="With --unique-against: batches to sample at most before giving up (nothing written).",
)
@click.option(
    "--name-prefix",
    default="SyntheticSeq",
    show_default=True,
    help="Record IDs are PREFIX_INDEX (upstream's default prefix).",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (a GPU if there is one), cpu, cuda or cuda:N. bf16 on a GPU that supports it.",
)
@click.option(
    "--model",
    "model_name",
    help="The architecture of an upstream .pt MODEL (e.g. genslm_25M).",
)
@click.option(
    "--trust-checkpoint",
    is_flag=True,
    help="Unpickle an upstream .pt MODEL in full (it can run code: only files you trust).",
)
def generate_command(
    model_spec: str,
    n: int,
    output: str,
    prompt: str,
    max_length: int,
    top_k: int,
    top_p: float,
    temperature: float,
    seed: int,
    batch_size: int,
    to_stop_codon: bool,
    translate: bool,
    known_files: tuple[str, ...],
    max_rounds: int,
    name_prefix: str,
    device: str,
    model_name: str | None,
    trust_checkpoint: bool,
) -> None:
    """Sample codon DNA from MODEL with upstream GenSLM's generate_dna settings.

    MODEL is an export directory, a dstrain checkpoint directory, or an upstream .pt file
    (with --model and --trust-checkpoint). Top-k 50 / top-p 0.95 sampling; the special
    tokens ([UNK] [CLS] [SEP] [PAD] [MASK]) are never sampled. Prints one line per record
    (codons, first stop codon, GC content, novelty) and the sampling rate.

    \b
    Examples:
      dstrain generate export/ -n 10 -o generated.fasta --max-length 256 --seed 1
      dstrain generate export/ -n 100 -o new.fasta --to-stop-codon --translate \\
          --unique-against train.fasta
    """
    from pathlib import Path

    from dstrain import generate

    problems = generate.check_generation_options(
        n=n,
        max_length=max_length,
        prompt=prompt,
        top_k=top_k,
        top_p=top_p,
        temperature=temperature,
        batch_size=batch_size,
        max_rounds=max_rounds,
        seed=seed,
    )
    if not name_prefix or any(c.isspace() for c in name_prefix):
        problems.append(f"--name-prefix {name_prefix!r}: give a non-empty word (no spaces).")
    if not Path(output).absolute().parent.is_dir():
        problems.append(f"-o {output}: its directory does not exist; create it first.")
    if problems:
        raise DstrainError(" ".join(problems), exit_code=2)
    protein_path = generate.protein_path_for(output) if translate else None
    known = generate.read_known_sequences(known_files) if known_files else None
    if known is not None:
        click.echo(f"{len(known)} known sequences from {len(known_files)} file(s)", err=True)

    from dstrain.inference import load_model, pick_device

    torch_device, dtype = pick_device(device)
    loaded = load_model(
        model_spec,
        model_name=model_name,
        trust_checkpoint=trust_checkpoint,
        device=torch_device,
        dtype=dtype,
    )
    step = f" at step {loaded.step}" if loaded.step is not None else ""
    click.echo(f"model: {loaded.architecture.name} from {loaded.source}{step}", err=True)

    def show_round(run) -> None:
        click.echo(
            f"round {run.rounds}: {len(run.records)}/{n} novel ({run.num_known} known, "
            f"{run.num_duplicate} repeated, {run.num_sampled} sampled)",
            err=True,
        )

    run = generate.generate_sequences(
        loaded.model,
        n=n,
        max_length=max_length,
        prompt=prompt,
        seed=seed,
        top_k=top_k,
        top_p=top_p,
        temperature=temperature,
        batch_size=batch_size,
        to_stop_codon=to_stop_codon,
        known=known,
        max_rounds=max_rounds,
        on_round=show_round if known is not None else None,
    )
    from dstrain.publish import write_file_atomic

    if protein_path is not None:
        fasta = generate.format_fasta(run.records, protein=True, name_prefix=name_prefix)
        write_file_atomic(protein_path, fasta)
    write_file_atomic(output, generate.format_fasta(run.records, name_prefix=name_prefix))
    click.echo(generate.format_summary(run.records, with_novelty=known is not None))
    also = f" and {protein_path}" if protein_path is not None else ""
    dtype_name = str(dtype).removeprefix("torch.")
    click.echo(
        f"wrote {output}{also}: {len(run.records)} sequences; {run.num_sampled_codons:,} "
        f"codons sampled in {run.seconds:.2f} s = {run.codons_per_s:,.0f} codons/s "
        f"({torch_device}, {dtype_name}, batch {batch_size})"
    )


# --------------------------------------------------------------------------------------
# hostfile, launch, doctor: clusters, through DeepSpeed's own launcher
# --------------------------------------------------------------------------------------


@cli.command("hostfile")
@click.option(
    "--from-slurm",
    "from_slurm",
    is_flag=True,
    help="Hosts from $SLURM_JOB_NODELIST (bracket ranges like gpu[01-04,07]).",
)
@click.option(
    "--from-pbs",
    "from_pbs",
    is_flag=True,
    help="Hosts from $PBS_NODEFILE (one line per slot: repeats count as slots).",
)
@click.option(
    "--check",
    "check_path",
    type=click.Path(dir_okay=False),
    metavar="HOSTFILE",
    help="Only validate an existing hostfile and print its world size.",
)
@click.option(
    "--slots",
    type=click.IntRange(min=1),
    help="Ranks (GPUs) per node. SLURM: default $SLURM_GPUS_ON_NODE. PBS: overrides "
    "the line counts.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    help="Write the hostfile here instead of stdout.",
)
def hostfile_command(
    from_slurm: bool, from_pbs: bool, check_path: str | None, slots: int | None, output: str | None
) -> None:
    """Write a DeepSpeed hostfile from a SLURM or PBS allocation, or check one.

    \b
    Examples:
      dstrain hostfile --from-slurm -o hostfile       # inside sbatch/salloc
      dstrain hostfile --from-pbs --slots 4 -o hostfile
      dstrain hostfile --check hostfiles/two_nodes.example
    """
    import os

    from dstrain.ds_config import write_text_atomic
    from dstrain.hostfile import (
        format_hostfile,
        hostfile_from_pbs,
        hostfile_from_slurm,
        hostfile_world_size,
        parse_hostfile,
    )

    if from_slurm + from_pbs + (check_path is not None) != 1:
        raise click.UsageError("give exactly one of --from-slurm, --from-pbs, --check")
    if check_path is not None:
        entries = parse_hostfile(check_path)
        total = hostfile_world_size(entries)
        click.echo(f"{check_path}: OK, {len(entries)} host(s), world size {total}")
        return
    if from_slurm:
        name = "SLURM_JOB_NODELIST" if "SLURM_JOB_NODELIST" in os.environ else "SLURM_NODELIST"
        nodelist = os.environ.get(name)
        if nodelist is None:
            raise DstrainError("$SLURM_JOB_NODELIST is not set: run this inside a SLURM job")
        if slots is None:
            gpus = os.environ.get("SLURM_GPUS_ON_NODE", "")
            if not gpus.isdigit() or int(gpus) < 1:
                raise DstrainError(
                    "give --slots N (ranks per node): $SLURM_GPUS_ON_NODE is not set "
                    "(the job asked for no GPUs with --gpus-per-node)"
                )
            slots = int(gpus)
        entries = hostfile_from_slurm(nodelist, slots, name)
        comment = f"dstrain hostfile --from-slurm: {name}={nodelist}, {slots} slot(s) per node"
    else:
        path = os.environ.get("PBS_NODEFILE")
        if not path:
            raise DstrainError("$PBS_NODEFILE is not set: run this inside a PBS job")
        entries = hostfile_from_pbs(path, slots)
        comment = f"dstrain hostfile --from-pbs: PBS_NODEFILE={path}"
    text = format_hostfile(entries, comment=comment)
    if output:
        write_text_atomic(output, text)
        total = hostfile_world_size(entries)
        click.echo(f"wrote {output}: {len(entries)} host(s), world size {total}", err=True)
    else:
        click.echo(text, nl=False)


@cli.command("launch")
@click.option(
    "--hostfile",
    type=click.Path(dir_okay=False),
    help="DeepSpeed hostfile (`HOST slots=N` lines): train on these nodes.",
)
@click.option(
    "--num-gpus",
    type=click.IntRange(min=1, max=1024),  # hostfile.MAX_SLOTS: one process per rank
    help="Ranks per node (without a hostfile: on this machine only).",
)
@click.option("--num-nodes", type=click.IntRange(min=1), help="Use the first N hosts only.")
@click.option(
    "--launcher",
    type=click.Choice(["pdsh", "openmpi", "mpich", "impi", "mvapich", "slurm"]),
    default="pdsh",
    show_default=True,
    help="DeepSpeed's multi-node backend.",
)
@click.option(
    "--master-addr",
    help="Address of node 0 (default: DeepSpeed asks it over ssh; "
    "127.0.0.1 for a hostfile naming only this machine).",
)
@click.option(
    "--master-port",
    type=click.IntRange(1, 65535),
    help="Rendezvous port (DeepSpeed's default 29500).",
)
@click.option(
    "--no-ssh",
    is_flag=True,
    help="Start only this node's ranks (run once per node, with --node-rank).",
)
@click.option("--node-rank", type=click.IntRange(min=0), help="This node's index, with --no-ssh.")
@click.option(
    "--no-ssh-check",
    is_flag=True,
    help="Skip DeepSpeed's ssh check of the first host (automatic for a hostfile "
    "naming only this machine).",
)
@click.option(
    "--launcher-arg",
    "extra",
    multiple=True,
    metavar="ARG",
    help="Pass ARG to DeepSpeed's launcher as is (repeatable), e.g. "
    "--launcher-arg=--ssh_port=2222.",
)
@click.option("--dry-run", is_flag=True, help="Check, print the command, run nothing.")
@click.argument("train_args", nargs=-1, type=click.UNPROCESSED)
def launch_command(
    train_args: tuple[str, ...], extra: tuple[str, ...], dry_run: bool, **options
) -> None:
    """Check, then run dstrain/train.py under DeepSpeed's launcher; TRAIN_ARGS after `--`.

    Validates the hostfile, the DeepSpeed config (--deepspeed_config) with the batch
    arithmetic for the real world size, `.deepspeed_env` files and the launcher backend,
    then replaces itself with `deepspeed ... dstrain/train.py TRAIN_ARGS`.

    \b
    Examples:
      dstrain launch --num-gpus 8 -- --deepspeed_config ds_configs/zero2_bf16.json
      dstrain launch --hostfile hostfile --dry-run -- --deepspeed_config ds.json \\
          --fasta genes.fasta --output-dir runs/x
    """
    import os
    import shlex

    from dstrain.launch import build_launcher_argv, preflight_launch

    kwargs = dict(options, train_args=list(train_args), extra_launcher_args=list(extra))
    check = preflight_launch(**kwargs)
    argv = build_launcher_argv(**kwargs)
    for note in check.notes:
        click.echo(f"note: {note}", err=True)
    for warning in check.warnings:
        click.echo(f"warning: {warning}", err=True)
    if dry_run:
        click.echo(shlex.join(argv))
        return
    click.echo(f"world size {check.world_size}: {shlex.join(argv)}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)


@cli.command("doctor")
@click.option(
    "--hostfile",
    type=click.Path(dir_okay=False),
    help="Also check every host: ssh, working directory, interpreter, versions.",
)
@click.option(
    "--output-dir",
    default="runs",
    show_default=True,
    help="Where runs write: free disk is checked there.",
)
@click.option("--ssh-port", type=click.IntRange(1, 65535), help="ssh port of the hosts.")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.IntRange(min=1, max=3600),  # larger overflow subprocess/poll timeouts
    default=10,
    show_default=True,
    help="ssh connect timeout per host, in seconds.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor_command(
    hostfile: str | None, output_dir: str, ssh_port: int | None, timeout_s: int, as_json: bool
) -> None:
    """Preflight: versions, accelerator, JIT ops, /dev/shm, disk; with --hostfile every host.

    Exit 0 when nothing fails (warnings allowed), 1 otherwise.
    """
    from dstrain.doctor import Check, check_hosts, check_local, checks_json, format_checks
    from dstrain.hostfile import hostfile_world_size, parse_hostfile

    checks = check_local(output_dir)
    if hostfile is not None:
        try:
            entries = parse_hostfile(hostfile)
        except DstrainError as exc:
            checks.append(Check("hostfile", "fail", str(exc).replace("\n", " ")))
        else:
            total = hostfile_world_size(entries)
            checks.append(Check("hostfile", "pass", f"{len(entries)} host(s), world size {total}"))
            checks += check_hosts(entries, timeout_s=timeout_s, ssh_port=ssh_port)
    click.echo(checks_json(checks) if as_json else format_checks(checks), nl=False)
    if any(c.status == "fail" for c in checks):
        raise click.exceptions.Exit(1)


# --------------------------------------------------------------------------------------
# estimate: per-GPU memory for ZeRO stages 0-3 (pure arithmetic, no torch import)
# --------------------------------------------------------------------------------------


@cli.command("estimate")
@click.option(
    "--model",
    "model_name",
    help="A registered architecture (genslm_25M, genslm_250M, genslm_2.5B, genslm_25B, ...) "
    "or a GPT-NeoX config.json (file or model directory).",
)
@click.option("--params", type=float, help="Parameter count instead of --model (e.g. 2.5e9).")
@click.option("--hidden", type=click.IntRange(min=1), help="Hidden size, with --params.")
@click.option("--layers", type=click.IntRange(min=1), help="Layers, with --params.")
@click.option("--heads", type=click.IntRange(min=1), help="Attention heads, with --params.")
@click.option("--intermediate", type=click.IntRange(min=1), help="MLP width, with --params.")
@click.option(
    "--vocab", type=click.IntRange(min=1), default=69, show_default=True, help="Vocabulary size."
)
@click.option(
    "--gpus-per-node", type=click.IntRange(min=1), help="GPUs (ranks) per node (default 1)."
)
@click.option("--nodes", type=click.IntRange(min=1), help="Nodes (default 1).")
@click.option(
    "--hostfile",
    type=click.Path(dir_okay=False),
    help="DeepSpeed hostfile: nodes = its hosts, world size = its slots.",
)
@click.option(
    "--gpu-mem-gib", type=click.FloatRange(min=0, min_open=True), help="Memory per GPU, GiB."
)
@click.option(
    "--cpu-mem-gib", type=click.FloatRange(min=0, min_open=True), help="CPU RAM per node, GiB."
)
@click.option(
    "--headroom",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.10,
    show_default=True,
    help="Share of GPU memory kept free (CUDA context, NCCL, fragmentation).",
)
@click.option("--micro-batch", type=click.IntRange(min=1), help="Sequences per GPU (default 1).")
@click.option(
    "--seq-len",
    type=click.IntRange(min=1),
    default=2048,
    show_default=True,
    help="Tokens per sequence.",
)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), help="Default bf16.")
@click.option(
    "--optimizer",
    type=click.Choice(["adamw", "adam"]),
    default="adamw",
    show_default=True,
    help="Adam family: 12 bytes/param of state in mixed precision (K = 12), 8 in fp32.",
)
@click.option(
    "--offload-optimizer", type=click.Choice(["none", "cpu", "nvme"]), help="Default none."
)
@click.option(
    "--offload-param",
    type=click.Choice(["none", "cpu", "nvme"]),
    help="Default none (ZeRO-3 only).",
)
@click.option(
    "--activation-checkpointing",
    type=click.Choice(["none", "full"]),
    default="none",
    show_default=True,
    help="full: keep each layer's input, recompute the layer in backward.",
)
@click.option(
    "--attention",
    type=click.Choice(["eager", "sdpa"]),
    default="sdpa",
    show_default=True,
    help="sdpa (flash / memory-efficient) stores no s x s attention scores.",
)
@click.option(
    "--deepspeed_config",
    "--deepspeed-config",
    "ds_config_path",
    type=click.Path(dir_okay=False),
    help="DeepSpeed JSON to read stage, buckets, offload, precision and micro batch from; "
    "flags given here win.",
)
@click.option(
    "--zero-init/--no-zero-init",
    default=None,
    help="Whether ZeRO-3 builds the model under deepspeed.zero.Init, as dstrain train does "
    "by default (no rank holds the whole model); --no-zero-init: every rank builds it whole "
    "first (dstrain train --no-zero-init). Stages 0-2 always do.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    metavar="FILE.png",
    help="Also draw a stacked bar per ZeRO stage against the usable GPU memory, the "
    "recommended stage marked (.png, .svg or .pdf; imports matplotlib).",
)
@click.option(
    "--measure",
    is_flag=True,
    help="Calibrate on this machine: for each candidate the estimate says might fit (ZeRO "
    "stage x micro batch x activation checkpointing x optimizer offload), start "
    "--gpus-per-node real ranks (CPU ranks on a CPU-only machine) for a few steps on "
    "--seq-len batches, print the measured peak beside the estimate, and write the fastest "
    "that fits as a DeepSpeed JSON (-o). Imports torch and DeepSpeed; minutes.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    help="With --measure: write the chosen DeepSpeed JSON here (atomically; default "
    "ds_config.json in the current directory, which must not exist).",
)
@click.option(
    "--steps",
    type=click.IntRange(2, 1000),
    default=3,
    show_default=True,
    help="With --measure: training steps per candidate (the first is not timed).",
)
@click.option(
    "--stages",
    default="0,1,2,3",
    show_default=True,
    help="With --measure: ZeRO stages to try, comma-separated.",
)
@click.option(
    "--max-micro-batch",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="With --measure and no --micro-batch: try micro batches 1, 2, 4, ... up to this.",
)
@click.option(
    "--max-candidates",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="With --measure: at most this many engine launches.",
)
@click.option(
    "--candidate-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=600.0,
    show_default=True,
    help="With --measure: seconds one candidate may run before it is stopped (reported).",
)
def estimate_command(
    model_name: str | None,
    params: float | None,
    hidden: int | None,
    layers: int | None,
    heads: int | None,
    intermediate: int | None,
    vocab: int,
    gpus_per_node: int | None,
    nodes: int | None,
    hostfile: str | None,
    gpu_mem_gib: float | None,
    cpu_mem_gib: float | None,
    headroom: float,
    micro_batch: int | None,
    seq_len: int,
    precision: str | None,
    optimizer: str,
    offload_optimizer: str | None,
    offload_param: str | None,
    activation_checkpointing: str,
    attention: str,
    ds_config_path: str | None,
    zero_init: bool | None,
    as_json: bool,
    plot_path: str | None,
    **measure_flags,
) -> None:
    """Per-GPU memory for ZeRO stages 0-3, and the lowest stage that fits.

    Parameters, gradients, optimizer states (as DeepSpeed allocates them, and the ZeRO
    paper's figure), activations, communication buffers, CPU RAM per node, fit. Pure
    arithmetic: no torch or deepspeed import. Example:

    \b
      dstrain estimate --model genslm_2.5B --gpus-per-node 4 --nodes 2 \\
          --gpu-mem-gib 40 --plot estimate.png
      dstrain estimate --model genslm_25M --gpus-per-node 2 --measure -o ds.json
    """
    from dstrain.calibrate import measure_command, refuse_measure_only_flags

    ctx = click.get_current_context()
    given = {name for name in ctx.params if ctx.get_parameter_source(name).name != "DEFAULT"}
    if measure_flags["measure"]:  # light until the flags are checked (torch comes later)
        measure_command(dict(ctx.params), given)
        return
    refuse_measure_only_flags(given)
    from dstrain.memory import estimate_from_flags

    if plot_path is not None:  # a name matplotlib cannot write is refused before any work
        from dstrain.estimate_chart import check_plot_path

        check_plot_path(plot_path)
    estimate = estimate_from_flags(
        model_name=model_name,
        params=params,
        hidden=hidden,
        layers=layers,
        heads=heads,
        intermediate=intermediate,
        vocab=vocab,
        gpus_per_node=gpus_per_node,
        nodes=nodes,
        hostfile=hostfile,
        gpu_mem_gib=gpu_mem_gib,
        cpu_mem_gib=cpu_mem_gib,
        headroom=headroom,
        micro_batch=micro_batch,
        seq_len=seq_len,
        precision=precision,
        optimizer=optimizer,
        offload_optimizer=offload_optimizer,
        offload_param=offload_param,
        activation_checkpointing=activation_checkpointing,
        attention=attention,
        ds_config_path=ds_config_path,
        zero_init=zero_init,
    )
    if as_json:
        import json

        from dstrain.memory import estimate_to_json

        click.echo(json.dumps(estimate_to_json(estimate), indent=2))
    else:
        from dstrain.memory import format_estimate_table

        click.echo(format_estimate_table(estimate))
    if plot_path is not None:
        from dstrain.estimate_chart import write_estimate_chart

        write_estimate_chart(estimate, plot_path)
        click.echo(f"wrote {plot_path}", err=True)


def _layer_list(ctx, param, value: str) -> list[int]:
    try:
        return [int(x) for x in value.replace(",", " ").split()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give integers, e.g. -1 or 0,-1") from None


@cli.command("embed")
@click.argument("model_spec", metavar="MODEL")
@click.argument("fasta", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="Output file: OUT.h5 (HDF5) or OUT.npy.")
@click.option(
    "--pooling",
    type=click.Choice(["mean", "mean-padded"]),
    default="mean",
    show_default=True,
    help="mean: over real tokens (upstream run_inference.py); mean-padded: every record "
    "padded to the context, pads included (upstream README recipe).",
)
@click.option(
    "--layers",
    default="-1",
    show_default=True,
    callback=_layer_list,
    help="Hidden states to keep, comma-separated, upstream's numbering: -1 the last "
    "(after the final layer norm), 0 the embedding output.",
)
@click.option("--per-token", is_flag=True, help="Keep every token's embedding (.h5 only).")
@click.option("--logits", is_flag=True, help="Also store per-token logits (.h5 only).")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Records a batch.")
@click.option(
    "--batch-tokens",
    type=int,
    default=65536,
    show_default=True,
    help="Padded tokens a batch at most.",
)
@click.option(
    "--long-records",
    type=click.Choice(["window", "truncate"]),
    default="window",
    show_default=True,
    help="Records over the context: windows averaged by length, or the first "
    "context-length codons (upstream).",
)
@click.option(
    "--partial-codon",
    type=click.Choice(["unk", "drop"]),
    default="unk",
    show_default=True,
    help="A trailing 1-2 base remainder: one [UNK] token, as upstream's inference reads "
    "records, or left out, as dstrain trains by default.",
)
@click.option("--model", "model_name", help="Architecture of a .pt file (e.g. genslm_25M).")
@click.option(
    "--trust-checkpoint",
    is_flag=True,
    help="Unpickle a checkpoint without a manifest (upstream .pt files need it).",
)
@click.option("--device", help="cpu, cuda, cuda:N (default: a GPU if there is one).")
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    help="Default: bf16 on a GPU that supports it, fp32 otherwise.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def embed_command(
    model_spec: str, fasta: tuple[str, ...], output: str, no_progress: bool, **options
) -> None:
    """Embed the records of FASTA files with MODEL (an export directory, a dstrain run or
    checkpoint directory, or an official .pt with --model and --trust-checkpoint).

    \b
    Several GPUs / ranks (each embeds a share, rank 0 writes one output):
      deepspeed --num_gpus 4 --module dstrain.embed MODEL A.fasta -o OUT.h5
      torchrun --nproc_per_node 4 -m dstrain.embed MODEL A.fasta -o OUT.h5
    """
    from dstrain.embed import run_embed

    summary = run_embed(model_spec, fasta, output, progress=not no_progress, **options)
    if summary:
        click.echo(summary, err=True)


# -- end of commands --


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; a `DstrainError` becomes one paragraph on stderr and its exit code."""
    try:
        # Without standalone mode click returns the code of a `ctx.exit(code)`.
        code = cli.main(args=argv, prog_name="dstrain", standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except DstrainError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except OSError as exc:  # a path the user gave that cannot be read or written
        where = f" {exc.filename}" if exc.filename else ""
        click.echo(f"error: cannot use{where}: {exc.strerror or exc}", err=True)
        sys.exit(1)
