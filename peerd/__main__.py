"""``python -m peerd`` is the ``peer`` command."""

from cli.app import main

main()
