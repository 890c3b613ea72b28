"""The Markdown handout written by --report: the run as students take it home.

Built from the journal records (not from the terminal), so it holds exactly what the run showed:
per scenario the verdicts, the real errors, the measured figures as tables, and the six sections
in fenced text blocks (their tables, charts and code keep their columns).
"""
from __future__ import annotations

from common.output import EMOJI, SECTIONS, TITLES


def _cell(value) -> str:
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 160 else text[:157] + "..."


def _table(headers: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _fence(text: str) -> list[str]:
    longest = max((len(run) for run in text.split("\n") if set(run) == {"`"}), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + "text", text.rstrip("\n"), fence, ""]


def render(journal: dict) -> str:
    db = journal.get("database") or {}
    out = [f"# {journal['script']}", "",
           f"Run `{journal.get('run_id')}` on {journal['started_at']}, {journal['seconds']:.1f} s, "
           f"PostgreSQL {db.get('server_version')} ({db.get('mode')}), exit code {journal['exit_code']}.", ""]
    out += _table(["scenario", "status", "triggered", "recovered", "cleaned", "seconds"],
                  [[f"[{r['title']}](#{r['id']})", r["status"], _yes(r["triggered"]), _yes(r["recovered"]),
                    _yes(r["cleaned"]), f"{r['seconds']:.2f}"] for r in journal["scenarios"]])
    for n, r in enumerate(journal["scenarios"], 1):
        out += [f'<a id="{r["id"]}"></a>', "", f"## {n}. {r['title']} (`{r['id']}`)", ""]
        if r.get("reason"):
            out += [f"**{r['status']}**: {_cell(r['reason'])}", ""]
        if r.get("observed_errors"):
            out += ["**Errors observed**", ""]
            out += _table(["type", "SQLSTATE", "message"],
                          [[f"`{e['type']}`", e["sqlstate"] or "", e["message"].splitlines()[0] if e["message"] else ""]
                           for e in r["observed_errors"]])
        if r.get("measurements"):
            out += ["**Measured**", ""]
            out += _table(["figure", "value"], [[f"`{k}`", v] for k, v in r["measurements"].items()])
        for key in SECTIONS:
            text = (r.get("sections") or {}).get(key, "")
            if text.strip():
                out += [f"### {EMOJI[key]} {TITLES[key]}", ""] + _fence(text)
    return "\n".join(out) + "\n"


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"
