"""``python -m cli`` is the ``peer`` command."""

from cli.app import main

main()
