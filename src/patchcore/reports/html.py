"""One self-contained `index.html` per category: metrics, plots and a sortable image table."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .thumbs import data_uri

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:middle}
th{background:#f0f0f0}th.sortable{cursor:pointer}th.sortable:hover{background:#e0e8ff}
tr.bad{background:#ffecec}.plots img{max-width:440px;margin:6px;border:1px solid #ddd}
td img{display:block}
"""

JS = """
function sortTable(th){
  const table=th.closest('table'),body=table.tBodies[0],col=th.cellIndex;
  const asc=th.dataset.order!=='asc';th.dataset.order=asc?'asc':'desc';
  const rows=Array.from(body.rows);
  rows.sort((a,b)=>{const x=a.cells[col].dataset.value??a.cells[col].textContent;
    const y=b.cells[col].dataset.value??b.cells[col].textContent;
    const nx=parseFloat(x),ny=parseFloat(y);
    const c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:x.localeCompare(y);return asc?c:-c;});
  rows.forEach(r=>body.appendChild(r));
}
"""


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return html.escape("" if value is None else str(value))


def metrics_table(row: dict[str, Any], skip: Sequence[str] = ()) -> str:
    """Two-column table of a results row."""
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_cell(v)}</td></tr>"
                    for k, v in row.items() if k not in skip)
    return f"<table class='metrics'>{cells}</table>"


def data_table(
    columns: Sequence[str], rows: Sequence[Sequence[Any]], table_id: str = "",
    row_classes: Sequence[str] | None = None,
) -> str:
    """A table whose headers sort it on click; cells may be (html, sort value) pairs."""
    head = "".join(f"<th class='sortable' onclick='sortTable(this)'>{html.escape(c)}</th>"
                   for c in columns)
    body = []
    for n, r in enumerate(rows):
        cells = []
        for v in r:
            if isinstance(v, tuple):
                shown, key = v
                cells.append(f"<td data-value='{html.escape(str(key))}'>{shown}</td>")
            else:
                cells.append(f"<td>{_cell(v)}</td>")
        cls = f" class='{row_classes[n]}'" if row_classes and row_classes[n] else ""
        body.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    ident = f" id='{table_id}'" if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def img_tag(uri: str, alt: str = "") -> str:
    """An <img> with a data: URI (or relative link)."""
    return f"<img src='{html.escape(uri, quote=True)}' alt='{html.escape(alt)}'>"


def embed_file(path: Path) -> str:
    """A PNG file as a data: URI."""
    return data_uri(path.read_bytes())


def write_page(path: Path, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """Write the page: a title and (heading, html) sections; CSS and JS are inline."""
    parts = [f"<h2>{html.escape(h)}</h2>\n{body}" for h, body in sections]
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style><script>{JS}</script>"
        f"</head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(parts) + "</body></html>"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
