"""The validation report as one self-contained HTML page (inline CSS, no scripts, nothing fetched).

great-expectations' Data Docs load their CSS and JavaScript from public CDNs: offline, or behind a company
firewall, their index lists no validations and every page is unstyled. This page is rendered from the same
result.json and lengths.json and reads the same with no network: `reports/validation/index.html`.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

PAGE = "index.html"
MAX_ROWS_SHOWN = 50

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;
  background:#f6f7f9;color:#1d2330}
main{max-width:980px;margin:0 auto;padding:24px 28px 40px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px}
.sub{color:#5a6270;font-size:13px;margin-bottom:16px}
.verdict{border-radius:8px;padding:14px 18px;font-size:18px;font-weight:600;margin:12px 0}
.pass{background:#e3f5e8;color:#17663a;border:1px solid #a6dcb6}
.fail{background:#fde8e8;color:#9b1c1c;border:1px solid #f3b4b4}
.stats{display:flex;gap:12px;flex-wrap:wrap}
.stat{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:10px 14px;min-width:120px}
.stat b{display:block;font-size:20px} .stat span{color:#5a6270;font-size:12px}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #dde1e7;border-radius:8px;font-size:13.5px}
th,td{text-align:left;padding:7px 10px;border-bottom:1px solid #eceef2;vertical-align:top}
th{background:#eef0f4;font-weight:600} tr:last-child td{border-bottom:none}
.badge{display:inline-block;border-radius:10px;padding:1px 9px;font-size:12px;font-weight:600;white-space:nowrap}
.b-passed{background:#d7f0de;color:#17663a}
.b-failed{background:#fbd5d5;color:#9b1c1c} .b-not{background:#fdf0c8;color:#7a5a00}
code{background:#eef0f4;border-radius:4px;padding:0 4px;font-size:12.5px}
.muted{color:#5a6270} a{color:#1f5fbf}
"""


def _esc(value) -> str:
    return html.escape("" if value is None else str(value))


def _badge(status: str) -> str:
    cls = {"passed": "b-passed", "failed": "b-failed"}.get(status, "b-not")
    return f'<span class="badge {cls}">{_esc(status)}</span>'


def _rows_cell(rule: dict) -> str:
    rows = rule.get("rows") or []
    if rule.get("status") == "not evaluated":
        return f'<span class="muted">{_esc(rule.get("reason"))}</span>'
    if not rows:
        observed = rule.get("observed_value")
        return f'<span class="muted">observed {_esc(observed)}</span>' if observed is not None else "none"
    shown = ", ".join(str(i) for i in rows[:MAX_ROWS_SHOWN])
    more = f" (+{len(rows) - MAX_ROWS_SHOWN} more)" if len(rows) > MAX_ROWS_SHOWN else ""
    return f"{len(rows)}: {shown}{more}"


def _row_tables(excluded: dict, parse_errors: dict) -> list[str]:
    """The rows left out, and the rows that do not parse, each with why."""
    parts: list[str] = []
    if excluded:
        parts.append(
            "<h2>Rows left out</h2><p class='muted'>They broke a row rule within "
            "<code>validate.max_bad_row_share</code>, so they are not in the validated data.</p>"
            "<table><tr><th>row</th><th>rules it broke</th></tr>"
        )
        for i, broke in list(excluded.items())[:MAX_ROWS_SHOWN]:
            broke = ", ".join(broke) if isinstance(broke, list) else broke
            parts.append(f"<tr><td>{_esc(i)}</td><td>{_esc(broke)}</td></tr>")
        parts.append("</table>")
    if parse_errors:
        parts.append("<h2>Rows that do not parse</h2><table><tr><th>row</th><th>why</th></tr>")
        for i, why in list(parse_errors.items())[:MAX_ROWS_SHOWN]:
            parts.append(f"<tr><td>{_esc(i)}</td><td>{_esc(why)}</td></tr>")
        parts.append("</table>")
    return parts


def _lengths_section(lengths: dict) -> str:
    """Token-length figures from lengths.json."""
    p = lengths.get("percentiles", {})
    return (
        "<h2>Token lengths</h2>"
        f"<p class='muted'>tokenizer <code>{_esc(lengths.get('tokenizer'))}</code>, on the exact text that will be "
        f"trained; <code>max_length</code> {_esc(lengths.get('max_length'))}. Histogram: "
        "<code>reports/lengths.png</code>.</p><div class='stats'>"
        + "".join(
            f"<div class='stat'><b>{_esc(round(v) if isinstance(v, float) else v)}</b><span>{k}</span></div>"
            for k, v in [
                ("rows", lengths.get("rows")),
                ("p50", p.get("p50")),
                ("p95", p.get("p95")),
                ("max", lengths.get("max")),
                ("over max_length", lengths.get("rows_over_max_length")),
            ]
        )
        + f"</div><p>policy <code>{_esc(lengths.get('policy'))}</code>: {_esc(lengths.get('policy_effect'))}</p>"
    )


def render(result: dict, lengths: dict | None = None) -> str:
    """The page's HTML, from result.json's dict (and lengths.json's, when there is one)."""
    rules = result.get("rules", [])
    ok = bool(result.get("success"))
    n_failed = sum(r.get("status") == "failed" for r in rules)
    n_passed = sum(r.get("status") == "passed" for r in rules)
    n_not = len(rules) - n_failed - n_passed
    verdict = (
        "Validation passed: every rule holds"
        if ok
        else f"Validation FAILED: {n_failed} rule(s) broken, nothing downstream runs"
    )
    source = result.get("input", {})
    excluded = result.get("excluded_rows", {})
    parse_errors = result.get("parse_errors", {})

    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>Validation report: {'passed' if ok else 'FAILED'}</title><style>{CSS}</style></head><body><main>",
        "<h1>Data validation report</h1>",
        f"<div class='sub'>suite <code>guanaco_conversations</code> on <code>{_esc(source.get('path'))}</code>"
        f" (sha256 <code>{_esc(str(source.get('sha256', ''))[:16])}</code>&hellip;)."
        " Rows count from 0 in that file.</div>",
        f"<div class='verdict {'pass' if ok else 'fail'}' id='verdict'>{_esc(verdict)}</div>",
        "<div class='stats'>",
        f"<div class='stat'><b>{len(rules)}</b><span>rules</span></div>",
        f"<div class='stat'><b>{n_passed}</b><span>passed</span></div>",
        f"<div class='stat'><b>{n_failed}</b><span>failed</span></div>",
        f"<div class='stat'><b>{n_not}</b><span>not evaluated</span></div>",
        f"<div class='stat'><b>{len(excluded)}</b><span>rows left out</span></div>",
        "</div>",
        "<h2>Rules</h2><table id='rules'><tr><th>rule</th><th>what it checks</th><th>status</th>"
        "<th>rows that break it</th></tr>",
    ]
    for r in rules:
        parts.append(
            f"<tr><td><code>{_esc(r.get('rule'))}</code></td><td>{_esc(r.get('description'))}</td>"
            f"<td>{_badge(r.get('status', ''))}</td><td>{_rows_cell(r)}</td></tr>"
        )
    parts.append("</table>")
    parts += _row_tables(excluded, parse_errors)
    if lengths:
        parts.append(_lengths_section(lengths))
    parts.append(
        "<h2>Files</h2><p><a href='result.json'>result.json</a> (every rule, row and reason, for machines) "
        "&middot; <a href='lengths.json'>lengths.json</a> &middot; great-expectations Data Docs: "
        "<a href='data_docs/index.html'>data_docs/index.html</a> <span class='muted'>(needs network for its "
        "styles and index)</span></p></main></body></html>"
    )
    return "\n".join(parts)


def write_validation_page(report_dir: Path) -> Path:
    """Render report_dir/result.json (+ lengths.json) into report_dir/index.html; returns the page's path."""
    report_dir = Path(report_dir)
    result = json.loads((report_dir / "result.json").read_text())
    lengths_path = report_dir / "lengths.json"
    lengths = json.loads(lengths_path.read_text()) if lengths_path.exists() else None
    page = report_dir / PAGE
    page.write_text(render(result, lengths), encoding="utf-8")
    return page
