"""``python -m harness.cli`` = the ``ptqbench`` command."""
from harness.cli import main

main()
