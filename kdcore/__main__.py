"""``python -m kdcore``: the same as the ``kdcore`` command."""

from kdcore.cli import main

raise SystemExit(main())
