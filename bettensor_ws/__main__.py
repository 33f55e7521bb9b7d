"""``python -m bettensor_ws``: the ``bettensor-ws`` command."""

from .node.cli import main

raise SystemExit(main())
