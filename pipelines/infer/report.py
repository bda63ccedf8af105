"""A cohort's report, ``OUTPUT/report.html``: one static page, self-contained (styles, script and thumbnails
inline; no network, no CDN), so that it opens from a file, a shared folder or an S3 bucket's static hosting.

One row per slide: its QC picture's thumbnail (linked to the picture), its flags (``unet.receipt``), its receipt's
measures, its cost, and links to its output and its MLflow run. Sort by any column (click its heading), filter by
flag or by name. While the batch runs, the page is rewritten as slides finish and reloads itself every
``RELOAD_S`` seconds; the last version, written when the batch ends, does not.
"""

from __future__ import annotations

import base64
import html
import io
import json
from datetime import UTC, datetime

import numpy as np

THUMBNAIL_HEIGHT = 96  # pixels
RELOAD_S = 30
# (row key, heading, how shown): the numeric columns of the table, after slide, status, flags
NUMBERS = (
    ("objects", "objects", "{:,.0f}"),
    ("tissue_mm2", "tissue mm²", "{:.3g}"),
    ("objects_per_mm2", "objects / mm²", "{:,.0f}"),
    ("object_area_um2_median", "median area µm²", "{:.3g}"),
    ("uncertain_share", "uncertain", "{:.1%}"),
    ("empty_tissue_chunk_share", "empty tissue chunks", "{:.0%}"),
    ("seconds", "wall s", "{:.1f}"),
    ("compute_seconds", "compute s", "{:.1f}"),
    ("gpu_seconds", "GPU s", "{:.1f}"),
    ("mpx_per_s", "Mpx/s", "{:.2f}"),
)

STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .3em; } p.meta { color: #555; margin: .2em 0; }
.controls { margin: 1em 0; display: flex; gap: 1em; align-items: center; }
table { border-collapse: collapse; } th, td { padding: 4px 8px; border-bottom: 1px solid #ddd; vertical-align: top; }
th { background: #f3f3f3; cursor: pointer; position: sticky; top: 0; white-space: nowrap; user-select: none; }
th.asc::after { content: " ▲"; } th.desc::after { content: " ▼"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.flags { color: #a40000; min-width: 14em; max-width: 28em; }
tr.flagged td:first-child { border-left: 4px solid #d33; } img { height: THUMBNAIL_HEIGHTpx; display: block; }
.status-failed { color: #a40000; } .status-pending { color: #888; }
""".replace("THUMBNAIL_HEIGHT", str(THUMBNAIL_HEIGHT))

SCRIPT = """
const table = document.getElementById('slides'), body = table.tBodies[0];
const filter = document.getElementById('flag'), search = document.getElementById('search');
function apply() {
  const kind = filter.value, text = search.value.toLowerCase();
  let shown = 0;
  for (const row of body.rows) {
    const kinds = row.dataset.flags ? row.dataset.flags.split('|') : [];
    const byFlag = kind === 'all' || (kind === 'flagged' ? kinds.length > 0 :
                   kind === 'unflagged' ? kinds.length === 0 : kinds.includes(kind));
    const visible = byFlag && row.dataset.slide.toLowerCase().includes(text);
    row.hidden = !visible; shown += visible;
  }
  document.getElementById('shown').textContent = shown + ' of ' + body.rows.length + ' slides shown';
}
function sortBy(th) {
  const column = th.cellIndex, numeric = th.dataset.type === 'number';
  const ascending = !th.classList.contains('asc');
  for (const other of table.tHead.rows[0].cells) other.classList.remove('asc', 'desc');
  th.classList.add(ascending ? 'asc' : 'desc');
  const key = row => { const v = row.cells[column].dataset.value; return numeric ? (v === '' ? NaN : Number(v)) : v; };
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = key(a), y = key(b);
    if (numeric) { if (isNaN(x)) return 1; if (isNaN(y)) return -1; return ascending ? x - y : y - x; }
    return ascending ? x.localeCompare(y) : y.localeCompare(x);
  });
  for (const row of rows) body.appendChild(row);
}
for (const th of table.tHead.rows[0].cells) if (th.dataset.type) th.addEventListener('click', () => sortBy(th));
filter.addEventListener('change', apply); search.addEventListener('input', apply); apply();
"""


def thumbnail(picture: np.ndarray | bytes) -> str:
    """A data URI of a JPEG ``THUMBNAIL_HEIGHT`` pixels high of a picture (a YX3 array, or a PNG file's bytes)."""
    from PIL import Image

    image = Image.fromarray(picture) if isinstance(picture, np.ndarray) else Image.open(io.BytesIO(picture))
    width = max(1, round(image.width * THUMBNAIL_HEIGHT / image.height))
    small = image.convert("RGB").resize((width, THUMBNAIL_HEIGHT), Image.Resampling.BILINEAR, reducing_gap=2.0)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def render(title: str, facts: list[str], rows: list[dict], final: bool) -> str:
    """The page. ``rows``: one dict per slide with ``slide``, ``status``, ``flags`` (list), the ``NUMBERS`` keys
    (numbers or empty), ``device``, and optional ``thumbnail`` (data URI), ``picture``, ``output`` and ``run``
    (links); ``facts``: lines under the title; ``final``: the batch has ended (no reloading)."""
    from unet.receipt import flag_kind

    kinds = sorted({flag_kind(flag) for row in rows for flag in row["flags"]})
    options = ["all", "flagged", "unflagged", *kinds]
    labels = {"all": "all slides", "flagged": "flagged", "unflagged": "not flagged"}
    select = "".join(f'<option value="{_e(o)}">{_e(labels.get(o, o))}</option>' for o in options)
    headings = ['<th data-type="text">picture</th>', '<th data-type="text">slide</th>',
                '<th data-type="text">status</th>', '<th data-type="text">flags</th>']  # fmt: skip
    headings += [f'<th data-type="number">{_e(heading)}</th>' for _, heading, _ in NUMBERS]
    headings += ['<th data-type="text">device</th>', '<th data-type="text">MLflow run</th>']
    reload = "" if final else f'<meta http-equiv="refresh" content="{RELOAD_S}">'
    written = datetime.now(UTC).isoformat(timespec="seconds")
    state = "final" if final else f"in progress: rewritten as slides finish, reloads every {RELOAD_S} s"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>{reload}
<link rel="icon" href="data:,"><style>{STYLE}</style></head>
<body><h1>{_e(title)}</h1>
{"".join(f'<p class="meta">{_e(fact)}</p>' for fact in facts)}
<p class="meta">written {written} ({state})</p>
<div class="controls"><label>flags <select id="flag">{select}</select></label>
<label>slide <input id="search" type="search" placeholder="name contains"></label><span id="shown"></span></div>
<table id="slides"><thead><tr>{"".join(headings)}</tr></thead>
<tbody>{"".join(_row(row) for row in rows)}</tbody></table>
<script type="application/json" id="data">{_json(rows)}</script>
<script>{SCRIPT}</script></body></html>
"""


def _row(row: dict) -> str:
    from unet.receipt import flag_kind

    kinds = "|".join(sorted({flag_kind(flag) for flag in row["flags"]}))
    picture = ""
    if row.get("thumbnail"):
        image = f'<img src="{row["thumbnail"]}" alt="QC picture of {_e(row["slide"])}">'
        picture = f'<a href="{_e(row["picture"])}">{image}</a>' if row.get("picture") else image
    slide = _link(row["slide"], row.get("output"))
    cells = [f'<td data-value="">{picture}</td>', f'<td data-value="{_e(row["slide"])}">{slide}</td>',
             f'<td data-value="{_e(row["status"])}" class="status-{_e(row["status"])}">{_e(row["status"])}</td>',
             f'<td data-value="{_e(kinds)}" class="flags">{"<br>".join(_e(f) for f in row["flags"])}</td>']  # fmt: skip
    for key, _, shown in NUMBERS:
        value = row.get(key)
        number = value if isinstance(value, int | float) else ""
        cells.append(f'<td class="num" data-value="{number}">{shown.format(number) if number != "" else ""}</td>')
    run = row.get("run_id") or ""
    cells += [f'<td data-value="{_e(row.get("device") or "")}">{_e(row.get("device") or "")}</td>',
              f'<td data-value="{_e(run)}">{_link(run[:8], row.get("run"))}</td>']  # fmt: skip
    flagged = ' class="flagged"' if row["flags"] else ""
    return f'<tr{flagged} data-slide="{_e(row["slide"])}" data-flags="{_e(kinds)}">{"".join(cells)}</tr>'


def _link(text: str, href: str | None) -> str:
    return f'<a href="{_e(href)}">{_e(text)}</a>' if href else _e(text)


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _json(rows: list[dict]) -> str:
    """The rows, less their pictures, as JSON for other tools (``</`` escaped: it sits in a script element)."""
    plain = [{k: v for k, v in row.items() if k != "thumbnail"} for row in rows]
    return json.dumps(plain, default=str).replace("</", "<\\/")
