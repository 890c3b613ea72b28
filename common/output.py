"""Printing: the six sections, ASCII fallback, colour rules, trimmed tracebacks, redaction.

Everything a script shows goes through one Console, which also keeps a plain-text copy of each
section for the journal. Secrets registered with `redact` are masked in all of it.
"""
from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

SECTIONS = ("description", "trigger", "error", "root_cause", "recovery", "prevention")
EMOJI = {
    "description": "📋", "trigger": "⚠️", "error": "❌",
    "root_cause": "📚", "recovery": "🔧", "prevention": "✅",
}
ASCII = {
    "description": "[DESCRIPTION]", "trigger": "[TRIGGER]", "error": "[ERROR]",
    "root_cause": "[ROOT CAUSE]", "recovery": "[RECOVERY]", "prevention": "[PREVENTION]",
}
TITLES = {
    "description": "Description", "trigger": "Trigger", "error": "Error",
    "root_cause": "Root cause", "recovery": "Recovery", "prevention": "Prevention",
}
# Characters the scripts use beyond ASCII, and what an ASCII console gets instead.
TRANSLIT = {"✔": "ok", "✘": "FAIL", "→": "->", "←": "<-", "—": "-", "–": "-", "…": "...",
            "×": "x", "█": "#", "▏": "|", "·": ".", "≤": "<=", "≥": ">=", "≠": "!=", "“": '"',
            "”": '"', "‘": "'", "’": "'", "•": "*", "─": "-", "│": "|", "µ": "u"}
COLOURS = {"error": "31", "trigger": "33", "recovery": "36", "prevention": "32", "ok": "32",
           "bad": "31", "dim": "2", "bold": "1"}


class Redactor:
    """Masks registered secrets (passwords) wherever text is shown."""

    def __init__(self):
        self.secrets: set[str] = set()

    def add(self, secret: str) -> None:
        if secret:
            self.secrets.add(str(secret))

    def __call__(self, text: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return text


redact = Redactor()


def words(value) -> str:
    """A value as a reader would write it, never a Python repr: NULL, yes/no, 'a 1, b 2', '1, 2'."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {words(v)}" for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple, set, frozenset)):
        return ", ".join(words(v) for v in value) or "none"
    return str(value)


def can_encode(stream, text: str) -> bool:
    encoding = getattr(stream, "encoding", None) or "ascii"
    try:
        text.encode(encoding)
        return True
    except (UnicodeEncodeError, LookupError):
        return False


def wants_colour(stream) -> bool:
    if "NO_COLOR" in os.environ or os.environ.get("TERM") == "dumb":
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def error_type(exc: BaseException) -> str:
    """Module-qualified class name, e.g. psycopg2.errors.CardinalityViolation."""
    cls = type(exc)
    module = cls.__module__
    if module == "builtins":
        return cls.__qualname__
    if module == "psycopg2.extensions" or module.startswith("psycopg2._"):
        module = "psycopg2"
    return f"{module}.{cls.__qualname__}"


def trimmed_traceback(exc: BaseException, verbose: bool = False) -> list[str]:
    """The frames that teach: the scripts' own, plus the frame that raised. Library plumbing
    (common/, tenacity, threading) is folded into a count unless verbose."""
    frames = traceback.extract_tb(exc.__traceback__)
    if verbose:
        kept = list(frames)
    else:
        common_dir = str(Path(__file__).resolve().parent)
        kept = [f for f in frames if not f.filename.startswith(common_dir)
                and "site-packages" not in f.filename and "/lib/python" not in f.filename]
        if frames and frames[-1] not in kept:
            kept.append(frames[-1])
    hidden = len(frames) - len(kept)
    lines = ["Traceback (most recent call last" + (f", {hidden} frame(s) of plumbing hidden" if hidden else "") + "):"]
    for f in kept:
        lines.append(f'  File "{Path(f.filename).name}", line {f.lineno}, in {f.name}')
        if f.line:
            lines.append(f"    {f.line.strip()}")
    return lines


class Console:
    """Writes sections to a stream and keeps their plain text for the journal."""

    def __init__(self, stream=None, ascii_only: bool | None = None, colour: bool | None = None,
                 verbose: bool = False):
        self.stream = stream or sys.stdout
        probe = "".join(EMOJI.values()) + "".join(TRANSLIT)
        self.ascii = (not can_encode(self.stream, probe)) if ascii_only is None else ascii_only
        self.colour = wants_colour(self.stream) if colour is None else colour
        self.verbose = verbose
        self.captured: dict[str, list[str]] | None = None

    # -- low level ---------------------------------------------------------------------------
    def text(self, s: str) -> str:
        s = redact(s)
        if self.ascii:
            for char, plain in TRANSLIT.items():
                s = s.replace(char, plain)
            s = s.encode("ascii", "replace").decode("ascii")
        elif not can_encode(self.stream, s):
            s = s.encode(self.stream.encoding or "ascii", "replace").decode(self.stream.encoding or "ascii")
        return s

    def paint(self, s: str, style: str | None) -> str:
        if not self.colour or not style or style not in COLOURS:
            return s
        return f"\033[{COLOURS[style]}m{s}\033[0m"

    def line(self, s: str = "", style: str | None = None, section: str | None = None) -> None:
        s = self.text(s)
        if self.captured is not None and section:
            self.captured.setdefault(section, []).append(s)
        self.stream.write(self.paint(s, style) + "\n")
        self.stream.flush()

    # -- structure ---------------------------------------------------------------------------
    def label(self, section: str) -> str:
        return ASCII[section] if self.ascii else f"{EMOJI[section]} {TITLES[section]}"

    def check_mark(self, ok: bool) -> str:
        return ("ok" if ok else "FAIL") if self.ascii else ("✔" if ok else "✘")

    def header(self, text: str) -> None:
        bar = "=" * min(78, max(20, len(text) + 4))
        self.line()
        self.line(bar, "bold")
        self.line(f"  {text}", "bold")
        self.line(bar, "bold")

    def section(self, name: str) -> None:
        self.line()
        self.line(self.label(name), name if name in COLOURS else "bold", section=None)

    def table(self, headers: list[str], rows: list[list], section: str | None = None) -> None:
        cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
        widths = [max(len(self.text(r[i])) for r in cells) for i in range(len(headers))]
        for n, r in enumerate(cells):
            self.line("   " + "  ".join(self.text(c).ljust(w) for c, w in zip(r, widths)).rstrip(),
                      section=section)
            if n == 0:
                self.line("   " + "  ".join("-" * w for w in widths), section=section)

    def bars(self, pairs: list[tuple[str, float]], width: int = 40, unit: str = "",
             section: str | None = None) -> None:
        """A horizontal text bar chart: one labelled bar per value, scaled to the largest."""
        top = max((v for _, v in pairs), default=0) or 1
        name_w = max((len(n) for n, _ in pairs), default=0)
        for name, value in pairs:
            n = int(round(width * value / top))
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            self.line(f"   {name.ljust(name_w)}  {'█' * n}{'▏' if n == 0 else ''} {shown}{unit}", section=section)

    def exception(self, exc: BaseException, section: str | None = "error") -> None:
        state = getattr(exc, "pgcode", None)
        self.line(f"   {error_type(exc)}" + (f"  (SQLSTATE {state})" if state else ""), "bad", section)
        for text_line in (str(exc).strip() or repr(exc)).splitlines()[:8]:
            self.line(f"   | {text_line}", section=section)
        for tb_line in trimmed_traceback(exc, self.verbose):
            self.line("   " + tb_line, "dim", section)
