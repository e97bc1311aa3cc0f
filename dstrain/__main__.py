"""`python -m dstrain` runs the CLI."""

from dstrain.cli import main

if __name__ == "__main__":
    main()
