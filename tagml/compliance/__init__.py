"""Keeping tags lawful to use: suitability, consent and purpose, erasure, the tag lifecycle, and the
governance store that records every decision (who, when, why) apart from the catalog file.

No Dagster imports: orchestration/ and the CLI call into these modules.
"""
