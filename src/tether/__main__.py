"""``python -m tether``: the same command line as ``tether``."""

from .cli import main

raise SystemExit(main())
