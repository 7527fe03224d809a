"""Keeping tags lawful to use: consent and purpose on exports, the tag lifecycle and dictionary, and
erasure with its receipt. Decisions are recorded in the governance store (tagml.core.governance),
apart from the catalog file.

No Dagster imports: orchestration/ and the CLI call into these modules.
"""
