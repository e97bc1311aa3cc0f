"""The `dstrain` command line.

Each command is a thin shell over one function: parse flags, call, print. This module
imports only click and dstrain's pure (L0) modules at top level; commands that need torch,
transformers or deepspeed import them inside their body, so `dstrain --help`,
`gen-config`, `estimate` and `validate --no-deepspeed` stay fast.
"""

from __future__ import annotations

import sys

import click

from dstrain import __version__
from dstrain.errors import DstrainError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="dstrain")
def cli() -> None:
    """Fine-tune GenSLM genome language models with DeepSpeed ZeRO."""


# -- end of commands --


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; a `DstrainError` becomes one paragraph on stderr and its exit code."""
    try:
        cli.main(args=argv, prog_name="dstrain", standalone_mode=False)
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
