"""Run the command line: ``python -m remotecli``."""

from remotecli.cli import main

main()
