"""`python -m codomyrmex_sandbox` is the console script."""

from codomyrmex_sandbox.cli import main

raise SystemExit(main())
