"""python -m connmeta: the same as the connmeta command."""

from connmeta.cli import main

raise SystemExit(main())
