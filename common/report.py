"""The Markdown handout written by --report: the run as students take it home.

Built from the journal records (not from the terminal), so it holds exactly what the run showed,
complete even when the room saw the presenter's mode: per scenario the verdicts, the real errors,
the measured figures with what they mean, and the six sections from their blocks: prose as
paragraphs, code fenced with its language (python, sql), tables as tables next to the sentence
that explains them, checks as a list. Each scenario ends with its lesson in one line and
questions for discussion. `render_lab` puts the journals of several scripts in one handout.
"""
from __future__ import annotations

import io
import re

from common.output import SECTIONS, TITLES, Console, paragraphs

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|#])")


def _escape(text: str) -> str:
    """Prose as Markdown shows it literally: `base * 2 ** attempt` must not turn bold."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def _escape_but_code(text: str) -> str:
    """Like _escape, but `backticks` stay code spans (the lesson's questions may use them)."""
    parts = re.split(r"(`[^`]+`)", text)
    return "".join(part if n % 2 else _escape(part) for n, part in enumerate(parts))


def _cell(value) -> str:
    text = _escape(str(value)).replace("\n", " ")
    return text if len(text) <= 200 else text[:197] + "..."


def _table(headers: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) or " " for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _fence(text: str, lang: str = "text") -> list[str]:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + lang, text.rstrip("\n"), fence, ""]


def _prose(text: str) -> list[str]:
    """Paragraphs; a paragraph of several items ((a), (b), 1., -) becomes a list."""
    out = []
    for para in paragraphs(text):
        if len(para) == 1:
            out += [_escape(para[0][2]), ""]
        else:
            out += [f"- {_escape(body)}" for _, _, body in para] + [""]
    return out


class _Text(io.StringIO):
    encoding = "utf-8"


def _bars(block: dict) -> list[str]:
    stream = _Text()
    Console(stream, ascii_only=False, colour=False, width=80).bars([tuple(p) for p in block["pairs"]],
                                                                     unit=block.get("unit", ""))
    return _fence(stream.getvalue())


def _blocks(blocks: list[dict]) -> list[str]:
    out: list[str] = []
    previous = None
    for b in blocks:
        kind = b["kind"]
        if previous in ("check", "measure") and kind not in ("check", "measure"):
            out.append("")
        if kind == "prose":
            out += _prose(b["text"])
        elif kind == "code":
            out += _fence(b["text"], b.get("lang") or "text")
        elif kind == "table":
            out += _table(b["headers"], b["rows"])
        elif kind == "bars":
            out += _bars(b)
        elif kind == "check":
            out.append(f"- {'✔' if b['ok'] else '✘ **failed:**'} {_escape(b['claim'])}")
        elif kind == "measure":
            if not b.get("shown", True):
                kind = previous  # recorded silently: it is in the figures table, not in the text
            else:
                out.append(f"- `{b['name']}` = {_escape(b['value'])}" + (f" ({_escape(b['note'])})" if b.get("note") else ""))
        elif kind == "step":
            out += [f"**{b['number']}. {_escape(b['text'])}**", ""]
            if "result" in b:  # the step ended
                out += [f"→ {_escape(b['result'])} ({b['seconds']:.2f} s)", ""]
        elif kind == "error":
            head = b["type"] + (f"  (SQLSTATE {b['sqlstate']})" if b.get("sqlstate") else "")
            body = [head] + ["| " + ln for ln in (b.get("message") or "").splitlines()] + (b.get("traceback") or [])
            out += _fence("\n".join(body))
        previous = kind
    return out + ([""] if previous in ("check", "measure") else [])


def _figures(record: dict) -> list[str]:
    """Every figure of the scenario, with what it means (the note it was measured with)."""
    notes = {}
    for section in (record.get("blocks") or {}).values():
        for b in section:
            if b["kind"] == "measure" and b.get("note"):
                notes[b["name"]] = b["note"]
    from common.output import words

    rows = [[f"`{k}`", _cell(words(v)), _cell(notes.get(k, ""))] for k, v in record["measurements"].items()]
    if not notes:  # no figure says what it means: no empty column
        return ["| figure | value |", "|---|---|"] + [f"| {r[0]} | {r[1]} |" for r in rows] + [""]
    lines = ["| figure | value | what it means |", "|---|---|---|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows] + [""]


def lesson_of(record: dict) -> str:
    """The lesson in one line: declared with the prevention, else its first sentence."""
    if record.get("lesson"):
        return record["lesson"]
    text = " ".join((record.get("sections") or {}).get("prevention", "").split())
    end = re.search(r"(?<=[\w)\]])[.!?](?=\s+[A-Z(`\"'])", text)
    return text[:end.end()] if end else text


def questions_of(record: dict) -> list[str]:
    """The questions for discussion (Markdown) the scenario declares, else three built from what
    it did: where it happens to you, how you would see it, and which proof the naive code would fail."""
    if record.get("questions"):
        return [_escape_but_code(q) for q in record["questions"]]
    slots = list(record.get("fixes") or {})  # slot -> what it held
    claims = [c["claim"] for c in record.get("checks") or [] if c["phase"] == "recovered" and c["ok"]]
    blocks = record.get("blocks") or {}
    detect = any(b["kind"] == "code" for b in blocks.get("root_cause", []))
    where = (f"Where in your own pipeline does code play the part of `{slots[0]}()`, and what would "
             "this fault do to it?") if slots else \
        "Where in your own pipeline could this failure happen, and what would it cost you?"
    see = ("Could you run the detection query of the root cause on your own system today? What would "
           "you alert on?") if detect else \
        "Which query, metric or alert would tell you about this before a user does?"
    proof = (f"The recovery proved: \"{_escape(claims[-1])}\". Which check would fail first if the naive code were "
             "put back" + (f" (`--control {slots[0]}`)" if slots else "") + ", and why?") if claims else \
        "What would convince you that the recovery really worked?"
    return [where, see, proof]


def _scenario(record: dict, number: str, level: int) -> list[str]:
    h = "#" * level
    out = [f'<a id="{_anchor(record)}"></a>', "", f"{h} {number}. {_escape(record['title'])} (`{record['id']}`)", ""]
    verdicts = ", ".join(f"{name} {_yes(record[name])}" for name in ("triggered", "recovered", "cleaned"))
    out += [f"**{record['status']}**: {verdicts}; {record['seconds']:.2f} s.", ""]
    if record.get("reason"):
        out += [f"Reason: {_cell(record['reason'])}", ""]
    if record.get("observed_errors"):
        out += ["**Errors observed**", ""]
        out += _table(["type", "SQLSTATE", "message"],
                      [[e["type"], e["sqlstate"] or "", e["message"].splitlines()[0] if e["message"] else ""]
                       for e in record["observed_errors"]])
    if record.get("measurements"):
        out += ["**Measured**", ""] + _figures(record)
    blocks = record.get("blocks") or {}
    for key in SECTIONS:
        content = _blocks(blocks[key]) if blocks.get(key) else \
            (_fence(record["sections"].get(key, "")) if (record.get("sections") or {}).get(key, "").strip() else [])
        if content:
            out += [f"{h}# {TITLES[key]}", ""] + content  # no emoji: without an emoji font it is an empty box
    lesson = lesson_of(record)
    if lesson:
        out += [f"> **Lesson:** {_escape(lesson)}", ""]
    out += _runbook(record.get("detection"))
    if record.get("status") != "interrupted":
        out += [f"{h}# For discussion", ""] + [f"{n}. {q}" for n, q in enumerate(questions_of(record), 1)] + [""]
    return out


def _runbook(detection: dict | None) -> list[str]:
    """The on-call entry of the scenario's detector: the check, what it found, the first response."""
    if not detection:
        return []
    kind = {"sql": "SQL check", "python": "check", "metric": "alert"}.get(detection.get("kind"), "check")
    proven = ("fired on the failure and was quiet after the fix" if detection.get("fired") and
              detection.get("quiet_after_fix") else "not proven in this run")
    out = [f"**Runbook** ({kind} `{detection['check']}`, {proven})", ""]
    if detection.get("runbook"):
        out += [_escape(detection["runbook"]), ""]
    return out


def _anchor(record: dict) -> str:
    return record.get("_anchor") or record["id"]


def _summary(records: list[dict], script_column: bool = False) -> list[str]:
    """One row per scenario: verdicts as marks (✔ triggered, recovered, cleaned), seconds, headline."""
    headers = (["script"] if script_column else []) + ["scenario", "status", "verdicts", "seconds",
                                                        "headline figure"]
    rows = []
    for r in records:
        marks = " ".join("kept" if v == "cleaned" and r.get("kept") else ("✔" if r[v] else "✘")
                         for v in ("triggered", "recovered", "cleaned"))
        row = ([r.get("_script", "")] if script_column else []) + [
            f"[{_escape(r['title'])}](#{_anchor(r)})", r["status"] if r["status"] == "passed" else f"**{r['status']}**",
            marks, f"{r['seconds']:.2f}", _cell(headline_text(r))]
        rows.append(row)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + \
        ["", "Verdicts: triggered, recovered, cleaned (✔ yes, ✘ no).", ""]


def headline_parts(record: dict) -> tuple[str, str]:
    """The headline figure as (name, value), one format for every scenario: the name in words with
    its unit in brackets (`naive worst case (s)`), the value `naive → fixed` when both were
    measured, else the one value."""
    h = record.get("headline")
    if not h:
        return "", ""
    name = h["name"][:-len("_before")] if "after" in h and h["name"].endswith("_before") else h["name"]
    unit = re.search(r"_(s|ms|pct|bytes)$", name)
    if unit:
        name = name[:unit.start()] + f" ({'%' if unit.group(1) == 'pct' else unit.group(1)})"
    return name.replace("_", " "), f"{h['value']}" + (f" → {h['after']}" if "after" in h else "")


def headline_text(record: dict) -> str:
    """The headline figure as one phrase: `rows missing: 500 → 0`."""
    name, value = headline_parts(record)
    return f"{name}: {value}" if name else ""


def _run_line(journal: dict) -> str:
    db = journal.get("database") or {}
    return (f"Run `{journal.get('run_id')}` on {journal['started_at']}, {journal['seconds']:.1f} s, "
            f"PostgreSQL {db.get('server_version')} ({db.get('mode')}), exit code {journal['exit_code']}.")


def render(journal: dict) -> str:
    out = [f"# {journal['script']}", "", _run_line(journal), ""]
    out += _summary(journal["scenarios"])
    for n, r in enumerate(journal["scenarios"], 1):
        out += _scenario(r, str(r.get("number") or n), 2)
    return "\n".join(out) + "\n"


def render_lab(lab: dict) -> str:
    """One handout for the whole lab: one summary of every scenario, then each script's."""
    out = ["# Pipeline failure lab", "",
           f"{len(lab['scripts'])} scripts, {sum(len(j['scenarios']) for j in lab['scripts'])} scenarios, "
           f"{lab['seconds']:.1f} s, exit code {lab['exit_code']}, started {lab['started_at']}.", ""]
    named = [[dict(r, _script=_short(j["script"]), _anchor=f"{_short(j['script'])}-{r['id']}") for r in j["scenarios"]]
             for j in lab["scripts"]]
    out += _summary([r for records in named for r in records], script_column=True)
    for j, records in zip(lab["scripts"], named):
        out += [f"## {j['script']}", "", _run_line(j), ""]
        for n, r in enumerate(records, 1):
            out += _scenario(r, str(r.get("number") or n), 3)
    return "\n".join(out) + "\n"


def _short(script: str) -> str:
    """fail_checkpoint_corruption.py -> checkpoint"""
    stem = script.rsplit(".", 1)[0]
    return stem.split("_")[1] if stem.startswith("fail_") and stem.count("_") >= 1 else stem


def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"
