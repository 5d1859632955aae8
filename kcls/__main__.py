"""`python -m kcls ...`: the `kcls` command, for environments without its script on PATH."""

from kcls.cli import main

main(prog_name="kcls")
