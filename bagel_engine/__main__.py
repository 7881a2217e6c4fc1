"""``python -m bagel_engine`` is the ``bagel`` command."""

from bagel_engine.cli.main import main

main()
