"""The tag API (FastAPI): a customer's tags, explanations, the tag dictionary with quality, audience counts and exports.

`create_app(settings)` builds the app; `tagml serve` runs it under uvicorn. Endpoints and scopes: docs/API.md.
"""
