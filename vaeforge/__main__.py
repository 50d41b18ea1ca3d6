"""`python -m vaeforge` runs the CLI."""

from vaeforge.cli import main

main()
