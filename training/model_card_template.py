"""The model card's two renderings (markdown and HTML) of one list of sections, each of facts and tables.

Every text reaching a card (catalog descriptions, reasons, names) is escaped for the format it lands in, so a
quote, a newline, a pipe or markup in a catalog field stays text."""

from dataclasses import dataclass, field

import jinja2


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[object, ...], ...]


@dataclass(frozen=True)
class Section:
    title: str
    facts: tuple[tuple[str, object], ...] = ()  # (label, value) lines
    tables: tuple[Table, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)


def text(value: object) -> str:
    """A value as card text: floats to 4 decimals (whole ones as integers: counts), None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4f}"
    return str(value)


def markdown_text(value: object) -> str:
    """One line of markdown that renders as the text itself (no table break, heading or HTML)."""
    out = " ".join(text(value).split())
    for raw, escaped in (("\\", "\\\\"), ("|", "\\|"), ("<", "&lt;"), (">", "&gt;"), ("`", "\\`")):
        out = out.replace(raw, escaped)
    return out


MARKDOWN = """# {{ title | md }}

{% for section in sections -%}
## {{ section.title | md }}

{% for label, value in section.facts -%}
- **{{ label | md }}**: {{ value | md }}
{% endfor %}
{%- for note in section.notes %}
{{ note | md }}
{% endfor %}
{%- for table in section.tables %}
| {% for h in table.headers %}{{ h | md }} | {% endfor %}
|{% for h in table.headers %} --- |{% endfor %}
{% for row in table.rows -%}
| {% for cell in row %}{{ cell | md }} | {% endfor %}
{% endfor %}
{% endfor %}
{% endfor -%}
"""

HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title | txt }}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 70em; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; } td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
th { background: #f3f3f3; } h2 { border-bottom: 1px solid #ddd; margin-top: 1.6em; }
</style></head><body>
<h1>{{ title | txt }}</h1>
{% for section in sections %}
<h2>{{ section.title | txt }}</h2>
{% if section.facts %}<ul>{% for label, value in section.facts %}<li><b>{{ label | txt }}</b>: {{ value | txt }}</li>{% endfor %}</ul>{% endif %}
{% for note in section.notes %}<p>{{ note | txt }}</p>{% endfor %}
{% for table in section.tables %}<table><tr>{% for h in table.headers %}<th>{{ h | txt }}</th>{% endfor %}</tr>
{% for row in table.rows %}<tr>{% for cell in row %}<td>{{ cell | txt }}</td>{% endfor %}</tr>
{% endfor %}</table>{% endfor %}
{% endfor %}
</body></html>
"""


def _environment(autoescape: bool) -> jinja2.Environment:
    env = jinja2.Environment(autoescape=autoescape, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["md"] = markdown_text
    env.filters["txt"] = text
    return env


def render_markdown(title: str, sections: list[Section]) -> str:
    return _environment(False).from_string(MARKDOWN).render(title=title, sections=sections)


def render_html(title: str, sections: list[Section]) -> str:
    return _environment(True).from_string(HTML).render(title=title, sections=sections)
