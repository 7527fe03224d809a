"""Rule tags: ordered SQL bands from the catalog, evaluated set-based over a feature snapshot."""

from training.catalog import TagSpec
from features.warehouse import sql_literal


def rule_case_sql(tag: TagSpec) -> str:
    """`CASE WHEN <band 1> THEN 'label' ... ELSE default END`: the first matching band wins."""
    assert tag.rule is not None, f"{tag.name} is not a rule tag"
    whens = " ".join(f"WHEN ({band.when}) THEN {sql_literal(band.label)}" for band in tag.rule.bands)
    return f"CASE {whens} ELSE {sql_literal(tag.rule.default)} END"


def rule_version(tag: TagSpec) -> str:
    """What every rule-tag row records as its producer: rule version plus the catalog entry hash."""
    assert tag.rule is not None
    return f"rule:{tag.rule.version}:{tag.content_hash()}"
