"""Serving tags to the systems that use them: the tag API (FastAPI), its keys and scopes, explanations
in words, and audience selection (圈人) with counts, exports and contact-frequency caps.

A layer above compliance (it reads the tag lifecycle, consent and the governance store) and below the
CLI and orchestration; no Dagster here.
"""
