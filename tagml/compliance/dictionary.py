"""The tag dictionary: what each catalog tag means, where it comes from, who owns it, its lifecycle status
and what currently produces it. As rows (JSON, a table) and as a markdown document for a compliance file."""

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tagml.compliance.lifecycle import TagStatus
from tagml.scoring.rules import rule_columns, rule_version
from tagml.training.catalog import Catalog, TagSpec

if TYPE_CHECKING:
    from mlflow import MlflowClient

REGISTRY_UNAVAILABLE = "unknown (registry unavailable)"
NO_CHAMPION = "no champion"


def current_champions(client: "MlflowClient", catalog: Catalog) -> dict[str, str | None] | None:
    """Each model tag's champion as registered model/version (None: no champion); None when the registry does not answer."""
    from tagml.training.registry import RegistryUnavailableError, champion_version
    from tagml.training.versions import registered_model_name

    try:
        versions = {t.name: champion_version(client, t.name) for t in catalog.model_tags}
    except RegistryUnavailableError:
        return None
    return {tag: f"{registered_model_name(tag)}/{v}" if v else None for tag, v in versions.items()}


def source_of(spec: TagSpec) -> str:
    """Model tags: their label sources and feature source; rule tags: the features their bands read."""
    if spec.suitability is not None:
        return f"suitability: the staged holdings and products against the valid {spec.suitability.assessment_tag} assessment"
    if spec.kind == "rule":
        return f"rule over {', '.join(rule_columns(spec))}"
    assert spec.label is not None
    labels = ", ".join(spec.label.sources) or "every tag_labels source"
    features = spec.label.feature_source if isinstance(spec.label.feature_source, str) else f"own table {spec.label.feature_source.path}"
    return f"labels: {labels}; features: {features}"


def tag_dictionary(catalog: Catalog, statuses: Mapping[str, TagStatus], champions: Mapping[str, str | None] | None) -> list[dict[str, Any]]:
    """One row per catalog tag; `champions` None means the registry could not be asked (producer unknown)."""
    rows = []
    for spec in catalog.tags:
        status = statuses[spec.name]
        if spec.kind == "rule":
            producer = rule_version(spec)
        elif champions is None:
            producer = REGISTRY_UNAVAILABLE
        else:
            producer = champions.get(spec.name) or NO_CHAMPION
        rows.append(
            {
                "tag": spec.name,
                "owner": spec.owner,
                "description": " ".join(spec.description.split()),
                "classes": list(spec.classes),
                "kind": spec.kind,
                "source": source_of(spec),
                "refresh": spec.refresh,
                "sensitivity": spec.sensitivity,
                "status": status.label,
                "status_by": status.last.by if status.last else None,
                "status_at": status.last.at if status.last else None,
                "producer": producer,
                "features": len(spec.feature_names) if spec.kind == "model" else 0,
                "promotion_metric": spec.promotion.metric if spec.kind == "model" else None,
            }
        )
    return rows


def _cell(value: object) -> str:
    """A markdown table cell: pipes escaped, whitespace (newlines) collapsed, so catalog text cannot break the table."""
    return " ".join(str(value).split()).replace("\\", "\\\\").replace("|", "\\|") or "-"


COLUMNS = ("tag", "owner", "kind", "classes", "source", "refresh", "sensitivity", "status", "producer")


def dictionary_markdown(rows: list[dict[str, Any]], catalog_path: str, generated_at: str) -> str:
    """The dictionary as a document: a summary table, then each tag's meaning and lifecycle."""
    lines = [
        "# Tag dictionary",
        "",
        f"Catalog `{_cell(catalog_path)}`, generated {generated_at}. Only tags with status `published` reach exports and lookups.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(", ".join(row[c]) if isinstance(row[c], list) else row[c]) for c in COLUMNS) + " |")
    for row in rows:
        decided = f" (last decision by {_cell(row['status_by'])} at {row['status_at']})" if row["status_by"] else " (never decided)"
        lines += [
            "",
            f"## {row['tag']}",
            "",
            _cell(row["description"]),
            "",
            f"- owner: {_cell(row['owner'])}; sensitivity: {row['sensitivity']}; refresh: {row['refresh']}",
            f"- kind: {row['kind']}; classes: {_cell(', '.join(row['classes']))}",
            f"- source: {_cell(row['source'])}",
            f"- status: {row['status']}{decided}",
            f"- current producer: {_cell(row['producer'])}",
        ]
    return "\n".join(lines) + "\n"
