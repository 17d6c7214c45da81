"""``python -m pacs_sentinel`` runs the ``sentinel`` command line."""

from pacs_sentinel.daemon.cli import main

raise SystemExit(main())
