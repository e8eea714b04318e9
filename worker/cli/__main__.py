"""``python -m worker.cli``: the ``genq`` command."""

from worker.cli import main

main()
