"""The tag catalog shipped with tagml (catalog.yaml, package data): the default for TAGML_CATALOG."""
