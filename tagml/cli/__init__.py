"""`tagml` command line: generate a synthetic bank, ingest, train and score (the Dagster jobs), run the demo, look up tags, drift and the registry.

The CLI only parses and prints: the work is in the packages and the walkthrough in orchestration.
Domain errors are named exceptions of the packages; `errors.EXIT_CODES` maps each to an exit code and
`main` prints it as one line (`tagml: error: ...`) on stderr. Nothing below the CLI imports it.
"""

# each module registers its commands on the app; imported in the order `tagml --help` lists them
from tagml.cli import generate, jobs, demo, uis, registry, card, governance, lookup, online, audience, serving, drift, documents, erasure  # noqa: F401, I001
from tagml.cli.app import main

__all__ = ["main"]
