"""One report, two renderings: Markdown (figures beside it as PNG files) and a self-contained HTML page
(figures inlined as data URIs, so it opens offline and can be mailed as one file)."""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusion_lab.reporting.tables import Table


@dataclass
class Document:
    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("p", text))

    def note(self, text: str) -> None:
        self.blocks.append(("note", text))

    def table(self, table: Table) -> None:
        self.blocks.append(("table", table))

    def figure(self, path: Path | None, caption: str) -> None:
        if path is not None:
            self.blocks.append(("figure", (path, caption)))


def format_cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, tuple):  # (mean, std, n)
        mean, std, n = value
        return f"{format_cell(mean)} ± {format_cell(std)}" if n > 1 else format_cell(mean)
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value == 0:
            return "0"
        magnitude = abs(value)
        return f"{value:.3g}" if magnitude < 1e-2 or magnitude >= 1e4 else f"{value:.4g}"
    return str(value)


def _is_best(table: Table, column: str, value: Any) -> bool:
    mean = value[0] if isinstance(value, tuple) else value
    return column in table.best and isinstance(mean, int | float) and mean == table.best[column]


def to_markdown(document: Document, folder: Path) -> str:
    lines = [f"# {document.title}", ""]
    for kind, content in document.blocks:
        if kind == "h2":
            lines += [f"## {content}", ""]
        elif kind == "p":
            lines += [content, ""]
        elif kind == "note":
            lines += [f"> **Note.** {content}", ""]
        elif kind == "table":
            lines += [
                "| " + " | ".join(content.header) + " |",
                "|" + "|".join("---" for _ in content.header) + "|",
            ]
            for row in content.rows:
                cells = [
                    f"**{format_cell(v)}**" if _is_best(content, c, v) else format_cell(v)
                    for c, v in zip(content.header, row, strict=True)
                ]
                lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
            lines.append("")
        elif kind == "figure":
            path, caption = content
            lines += [f"![{caption}]({path.relative_to(folder).as_posix()})", "", f"*{caption}*", ""]
    return "\n".join(lines)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1300px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; white-space: nowrap; }
.scroll { overflow-x: auto; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
td.best { font-weight: bold; background: #e6f4ea; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.5em 1em; }
"""


def to_html(document: Document) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(document.title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(document.title)}</h1>",
    ]
    for kind, content in document.blocks:
        if kind == "h2":
            parts.append(f"<h2>{html.escape(content)}</h2>")
        elif kind == "p":
            parts.append(f"<p>{html.escape(content)}</p>")
        elif kind == "note":
            parts.append(f'<p class="note"><b>Note.</b> {html.escape(content)}</p>')
        elif kind == "table":
            parts.append(
                '<div class="scroll"><table><tr>'
                + "".join(f"<th>{html.escape(h)}</th>" for h in content.header)
                + "</tr>"
            )
            for row in content.rows:
                cells = "".join(
                    f'<td class="best">{html.escape(format_cell(v))}</td>'
                    if _is_best(content, c, v)
                    else f"<td>{html.escape(format_cell(v))}</td>"
                    for c, v in zip(content.header, row, strict=True)
                )
                parts.append(f"<tr>{cells}</tr>")
            parts.append("</table></div>")
        elif kind == "figure":
            path, caption = content
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)
