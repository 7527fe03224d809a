"""`python -m tagml.cli`."""

from tagml.cli import main

raise SystemExit(main())
