"""Printing: the six sections, ASCII fallback, colour rules, trimmed tracebacks, redaction.

Everything a script shows goes through one Console, which fits it to the terminal (prose reflowed,
tables wrapped by column, over-wide code wrapped with a visible marker), and keeps a plain-text
copy of each section plus its blocks (prose, code, tables, checks...) for the journal and the
handout. Secrets registered with `redact` are masked in all of it.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import textwrap
import time
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
# Marks the continuation of a code line too wide for the terminal (a fallback: code is meant to fit).
CONTINUED = "↪"
# Characters the scripts use beyond ASCII, and what an ASCII console gets instead.
TRANSLIT = {"✔": "ok", "✘": "FAIL", "→": "->", "←": "<-", "—": "-", "–": "-", "…": "...",
            "×": "x", "█": "#", "▏": "|", "·": ".", "≤": "<=", "≥": ">=", "≠": "!=", "“": '"',
            "”": '"', "‘": "'", "’": "'", "•": "*", "─": "-", "│": "|", "µ": "u", CONTINUED: ">>",
            "\u00a0": " "}
COLOURS = {"error": "31", "trigger": "33", "recovery": "36", "prevention": "32", "ok": "32",
           "bad": "31", "dim": "2", "bold": "1"}
NARROW, WIDEST = 80, 100  # the width off a terminal or on a narrow one; the widest prose a room reads
PROSE = "   "  # a section's text
CODE = "      "  # code inside a section


class Redactor:
    """Masks passwords by structure wherever text is shown: the password of every connection URL
    (the userinfo, up to the last '@' of the authority, so even a password libpq would misread
    is covered; and a `password=` query parameter), of every `password=value` conninfo pair, and
    of every `'password': value` item of a printed dict or JSON object. Never by blind substring:
    a short password such as `0` or `postgres` must not mangle the rest of the text. Registered
    secrets are masked as substrings only when they are long enough (LONG_SECRET characters) to
    be a token that cannot occur in text by chance, e.g. a generated role password."""

    LONG_SECRET = 16
    _URL = re.compile(r"(?P<scheme>postgres(?:ql)?://)(?P<rest>[^\s\"'<>`]*)", re.IGNORECASE)
    _PAIR = re.compile(r"(?P<key>\bpassword\s*=\s*)(?P<value>'(?:[^'\\]|\\.)*'|[^\s'\"&]+)", re.IGNORECASE)
    _ITEM = re.compile(r"""(?P<key>(?P<q>['"])password(?P=q)\s*:\s*)"""
                       r"""(?P<value>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s,}]+)""", re.IGNORECASE)

    def __init__(self):
        self.secrets: set[str] = set()

    def add(self, secret: str) -> None:
        if secret:
            self.secrets.add(str(secret))

    def __call__(self, text: str) -> str:
        text = self._URL.sub(self._mask_url, text)
        text = self._PAIR.sub(lambda m: m.group("key") + "***", text)
        text = self._ITEM.sub(lambda m: m.group("key") + self._masked_value(m.group("value")), text)
        for secret in sorted(self.secrets, key=len, reverse=True):
            if len(secret) >= self.LONG_SECRET:
                text = text.replace(secret, "***")
        return text

    @staticmethod
    def _masked_value(value: str) -> str:
        return value[0] + "***" + value[0] if value[:1] in ("'", '"') else "***"

    @staticmethod
    def _mask_url(m) -> str:
        rest = m.group("rest")  # a password=... query parameter is masked by _PAIR afterwards
        at = rest.rfind("@")  # the last '@': a raw '@', '/', '?' or '#' in the password stays inside
        if at >= 0:
            userinfo, hostpart = rest[:at], rest[at:]
            user = userinfo.split(":", 1)[0]
            rest = (f"{user}:***" if ":" in userinfo else user) + hostpart
        return m.group("scheme") + rest


redact = Redactor()

def words(value) -> str:
    """A value as a reader would write it, never a Python repr: NULL, yes/no, 'a 1, b 2', '1, 2'."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):  # a sum of money stays a sum of money, never 2.50499e+08
        if value != value or value in (float("inf"), float("-inf")) or abs(value) < 1e5:
            return f"{value:g}"
        return f"{value:.0f}" if value == int(value) else f"{value:.2f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {words(v)}" for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple, set, frozenset)):
        return ", ".join(words(v) for v in value) or "none"
    return str(value)



def cell(value) -> str:
    """A table cell: words for NULL, booleans and containers; numbers and text as they are (a
    float keeps all its digits)."""
    return words(value) if value is None or isinstance(value, (bool, list, tuple, dict, set, frozenset)) \
        else str(value)

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


def terminal_width(stream) -> int:
    """The columns to fill: the terminal's (COLUMNS overrides it), at most WIDEST; NARROW when the
    stream is not a terminal or the terminal is narrower (a projector's terminal wraps anyway)."""
    try:
        if not stream.isatty():
            return NARROW
        columns = shutil.get_terminal_size((NARROW, 24)).columns
        if "COLUMNS" not in os.environ:
            columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return NARROW
    return max(NARROW, min(WIDEST, columns))



def terminal_rows(stream) -> int:
    """The terminal's height (LINES overrides it), 24 when it cannot be told."""
    if os.environ.get("LINES", "").isdigit():
        return int(os.environ["LINES"])
    try:
        return os.get_terminal_size(stream.fileno()).lines or 24  # 0: a terminal that does not say
    except (AttributeError, OSError, ValueError):
        return 24


def typed_path(path: str) -> str:
    """A path as a user would type it here: relative to the current folder when below it, and
    never through a symlink (a venv's python links to an interpreter without the venv's packages)."""
    absolute = os.path.abspath(path)
    try:
        rel = os.path.relpath(absolute, os.getcwd())
    except ValueError:  # another drive (Windows)
        return absolute
    return absolute if rel.startswith("..") else rel

def error_type(exc: BaseException) -> str:
    """Module-qualified class name, e.g. psycopg2.errors.CardinalityViolation."""
    cls = type(exc)
    module = cls.__module__
    if module == "builtins":
        return cls.__qualname__
    if module == "psycopg2.extensions" or module.startswith("psycopg2._"):
        module = "psycopg2"
    return f"{module}.{cls.__qualname__}"


def frame_path(filename: str) -> str:
    """A frame's file as its import path names it: `tenacity/__init__.py`, `json/decoder.py`,
    `common/db.py`, `fail_retry_exhaustion.py`; never a bare `__init__.py`."""
    path = Path(filename).resolve()
    best = None
    for entry in sys.path:
        try:
            rel = path.relative_to(Path(entry or ".").resolve())
        except (ValueError, OSError):
            continue
        if best is None or len(rel.parts) < len(best.parts):
            best = rel
    if best is None or best.parts[0] in ("site-packages", "dist-packages"):
        best = Path(*path.parts[-2:]) if len(path.parts) > 1 else path
    return best.as_posix()


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
        lines.append(f'  File "{frame_path(f.filename)}", line {f.lineno}, in {f.name}')
        if f.line:
            lines.append(f"    {f.line.strip()}")
    return lines


# -- fitting text to the width ------------------------------------------------------------------
# A list item: "(a) ", "1. ", "b) ", "- ", "* ", "• ". Its continuation lines are indented under
# its text; any other line indented like that joins it, so hand-wrapped prose reflows.
_ITEM = re.compile(r"(\(\w{1,3}\)|\d{1,2}[.)]|[a-z][)]|[-*•])\s+")


def paragraphs(text: str) -> list[list[tuple[str, str, str]]]:
    """Prose as paragraphs (split at blank lines) of items (indent, hanging indent, joined text)."""
    out: list[list[tuple[str, str, str]]] = [[]]
    for raw in textwrap.dedent(text).strip("\n").split("\n"):
        body = raw.strip()
        if not body:
            if out[-1]:
                out.append([])
            continue
        indent = raw[:len(raw) - len(raw.lstrip())].replace("\t", "    ")
        item = _ITEM.match(body)
        items = out[-1]
        if items and not item and len(indent) == len(items[-1][1]):
            first, hang, joined = items[-1]
            items[-1] = (first, hang, f"{joined} {body}")
        else:
            items.append((indent, indent + " " * (item.end() if item else 0), body))
    return [p for p in out if p]


class _Wrapper(textwrap.TextWrapper):
    """Breaks at spaces; a word too long for a line (a path, a URL) breaks after a '/', '?' or '&',
    never inside a name; only a word with no such place is cut."""

    _PLACES = re.compile(r"(?<=[/?&])(?=[^/?&])")

    def _split(self, text):
        chunks = []
        for chunk in super()._split(text):
            if len(chunk) > 24 and not chunk.isspace():
                chunks += [c for c in self._PLACES.split(chunk) if c]
            else:
                chunks.append(chunk)
        return chunks


def wrap(text: str, width: int, indent: str = "", hang: str | None = None) -> list[str]:
    """One logical line wrapped at word boundaries to `width` (a long path breaks after a '/')."""
    return _Wrapper(width, initial_indent=indent, subsequent_indent=indent if hang is None else hang,
                    break_long_words=True, break_on_hyphens=False, drop_whitespace=True).wrap(text) \
        or [indent.rstrip()]


def wrap_code(line: str, width: int) -> list[str]:
    """A code line that does not fit: cut at a space where possible, each continuation marked and
    indented under the line, so a reader sees it is one line. Code that fits is left alone."""
    line = line.rstrip().expandtabs(4)
    if len(line) <= width:
        return [line]
    lead = line[:len(line) - len(line.lstrip())]
    pieces, rest, prefix = [], line, ""
    while len(prefix + rest) > width:
        room = width - len(prefix)
        floor = (len(lead) if not pieces else 0) + 8
        cut = max(rest.rfind(" ", floor, room), rest.rfind(",", floor, room - 1) + 1, rest.rfind("(", floor, room - 1) + 1)
        if cut <= floor:
            cut = room
        pieces.append(prefix + rest[:cut].rstrip())
        rest, prefix = rest[cut:].lstrip(), lead + "  " + CONTINUED + " "
    return pieces + [prefix + rest]


def fit_columns(widths: list[int], floors: list[int], room: int) -> list[int] | None:
    """Column widths that fit `room` (two spaces between columns), narrowing the widest first but
    none below its floor; None when even the floors do not fit."""
    sep = 2 * (len(widths) - 1)
    if sum(floors) + sep > room:
        return None
    widths = list(widths)
    while sum(widths) + sep > room:
        widest = max(range(len(widths)), key=lambda i: (widths[i] - floors[i] > 0, widths[i]))
        widths[widest] -= 1
    return widths


def table_lines(headers: list[str], rows: list[list[str]], width: int, indent: str = PROSE) -> list[str]:
    """A text table that fits `width`: as is when it fits; else its wide columns wrap inside their
    cells; else (too many columns) it is cut into several tables, each repeating the first column."""
    cells = [list(headers)] + [list(r) for r in rows]
    room = width - len(indent)
    natural = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    columns = range(len(headers))
    words_ = [max((len(w) for r in cells for w in r[i].split()), default=1) for i in columns]
    heads = [max((len(w) for w in headers[i].split()), default=1) for i in columns]
    # first try to wrap between words only; then let the widest words break
    floors = [min(natural[i], max(8, heads[i])) for i in columns]
    widths = fit_columns(natural, [min(natural[i], max(heads[i], min(words_[i], 30))) for i in columns], room) or \
        fit_columns(natural, floors, room)
    if widths is None and len(headers) > 2:
        groups, current = [], [0]
        for i in range(1, len(headers)):
            trial = current + [i]
            if fit_columns([natural[j] for j in trial], [floors[j] for j in trial], room) is None and len(current) > 1:
                groups.append(current)
                current = [0, i]
            else:
                current = trial
        groups.append(current)
        out = []
        for g in groups:
            out += table_lines([headers[j] for j in g], [[r[j] for j in g] for r in rows], width, indent) + [""]
        return out[:-1]
    if widths is None:
        widths = [max(1, room // max(1, len(headers)) - 2)] * len(headers)
    out = []
    for n, row in enumerate(cells):
        wrapped = [textwrap.wrap(c, w, break_long_words=True, break_on_hyphens=False) or [""]
                   for c, w in zip(row, widths)]
        for k in range(max(len(c) for c in wrapped)):
            parts = [(c[k] if k < len(c) else "").ljust(w) for c, w in zip(wrapped, widths)]
            out.append((indent + "  ".join(parts)).rstrip())
        if n == 0:
            out.append(indent + "  ".join("-" * w for w in widths))
    return out


class Console:
    """Writes sections to a stream and keeps their plain text (and their blocks) for the journal."""

    def __init__(self, stream=None, ascii_only: bool | None = None, colour: bool | None = None,
                 verbose: bool = False, width: int | None = None, brief: bool = False):
        self.stream = stream or sys.stdout
        probe = "".join(EMOJI.values()) + "".join(TRANSLIT)
        self.ascii = (not can_encode(self.stream, probe)) if ascii_only is None else ascii_only
        self.colour = wants_colour(self.stream) if colour is None else colour
        self.verbose = verbose
        self.brief = brief  # presenter's mode: the essentials of each section only
        self.width = width or terminal_width(self.stream)
        self.captured: dict[str, list[str]] | None = None
        self.blocks: dict[str, list[dict]] | None = None
        self.pager = False  # --pause on a terminal: no reveal taller than the screen (see page)
        self.rows = 24
        self.shown = 0  # lines since the last Enter
        self.waited = 0.0  # seconds spent waiting for Enter here (the room's time, not the scenario's)

    def page(self, rows: int | None = None) -> None:
        """Pause like --pause: a long section waits for Enter before each step, and any text about
        to fill the screen waits too, so the room never sees a heading scroll away unread."""
        self.pager = True
        self.rows = max(8, rows or terminal_rows(self.stream))

    def wait(self, what: str) -> None:
        """Prompt on its own line and wait for Enter (stdin); counted as waiting, not running."""
        started = time.perf_counter()
        self.stream.write(self.text(f"   (Enter for {what}) "))
        self.stream.flush()
        sys.stdin.readline()
        self.shown = 0
        self.waited += time.perf_counter() - started

    def wait_before(self, what: str) -> None:
        """With --pause, wait before a closing part (a summary); a Ctrl-C here only skips the wait:
        the run is over, its journal still to be written."""
        if self.pager:
            try:
                self.wait(what)
            except (KeyboardInterrupt, EOFError):
                self.pager = False

    def step_break(self) -> None:
        """Before a recovery step: with --pause, wait unless the screen was just cleared for it."""
        if self.pager and self.shown > 3:
            self.wait("the next step")

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
        """One physical line, as given (the methods below fit text to the width first)."""
        s = self.text(s)
        if self.captured is not None and section:
            self.captured.setdefault(section, []).append(s)
        if self.pager and self.shown >= self.rows - 2:  # the previous prompt and the next one stay on screen
            self.wait("more")
        self.stream.write(self.paint(s, style) + "\n")
        self.stream.flush()
        self.shown += 1

    def block(self, section: str | None, kind: str, **content) -> dict:
        """Record a block of a section for the journal and the handout (whatever was printed)."""
        entry = {"kind": kind, **content}
        if self.blocks is not None and section:
            self.blocks.setdefault(section, []).append(entry)
        return entry

    def wrapped(self, s: str, indent: str = PROSE, hang: str | None = None, style: str | None = None,
                section: str | None = None) -> int:
        """One logical line reflowed to the width; returns the number of lines printed."""
        lines = wrap(self.text(s), self.width, indent, hang)
        for ln in lines:  # a no-break space holds "0.02 s" together while wrapping, no longer
            self.line(ln.replace("\u00a0", " "), style, section)
        return len(lines)

    def prose(self, text: str, indent: str = PROSE, style: str | None = None, section: str | None = None,
              first_only: bool = False) -> None:
        """Paragraphs reflowed to the width; list items keep their hanging indent. With
        `first_only`, only the first paragraph (the presenter's essentials)."""
        paras = paragraphs(text)
        for n, para in enumerate(paras[:1] if first_only else paras):
            if n:
                self.line("", None, section)
            for first, hang, body in para:
                self.wrapped(body, indent + first, indent + hang, style, section)

    def code(self, text: str, indent: str = CODE, section: str | None = None) -> None:
        """Code keeps its lines; one too wide for the terminal is wrapped with a visible marker."""
        for src in textwrap.dedent(text).strip("\n").splitlines():
            for ln in wrap_code(indent + self.text(src), self.width):
                self.line(ln, "dim", section)

    # -- structure ---------------------------------------------------------------------------
    def label(self, section: str) -> str:
        return ASCII[section] if self.ascii else f"{EMOJI[section]} {TITLES[section]}"

    def check_mark(self, ok: bool) -> str:
        return ("ok" if ok else "FAIL") if self.ascii else ("✔" if ok else "✘")

    def header(self, text: str) -> None:
        """A title between two rules as wide as the title (a long title wraps)."""
        lines = wrap(self.text(text), self.width - 2, "  ", "  ")
        bar = "=" * min(self.width, max(20, max(len(ln) for ln in lines) + 2))
        self.line()
        self.line(bar, "bold")
        for ln in lines:
            self.line(ln, "bold")
        self.line(bar, "bold")

    def section(self, name: str) -> None:
        self.shown = 0  # --pause waited for Enter just before a section
        self.line()
        self.line(self.label(name), name if name in COLOURS else "bold", section=None)

    def table(self, headers: list[str], rows: list[list], section: str | None = None) -> None:
        head = [self.text(str(h)) for h in headers]
        body = [[self.text(cell(c)) for c in r] for r in rows]
        for ln in table_lines(head, body, self.width):
            self.line(ln, section=section)

    def bars(self, pairs: list[tuple[str, float]], width: int = 40, unit: str = "",
             section: str | None = None) -> None:
        """A horizontal text bar chart: one labelled bar per value, scaled to the largest, as long
        as `width` where the terminal has room."""
        top = max((v for _, v in pairs), default=0) or 1
        name_w = max((len(n) for n, _ in pairs), default=0)
        shown = [f"{v:g}" if isinstance(v, float) else str(v) for _, v in pairs]
        room = self.width - len(PROSE) - name_w - 2 - 1 - max((len(s) for s in shown), default=0) - len(unit) - 1
        width = max(10, min(width, room))
        for (name, value), text in zip(pairs, shown):
            n = int(round(width * value / top))
            self.line(f"{PROSE}{name.ljust(name_w)}  {'█' * n}{'▏' if n == 0 else ''} {text}{unit}", section=section)

    def exception(self, exc: BaseException, section: str | None = "error", brief: bool = False) -> dict:
        """The exception's type (and SQLSTATE), its message, a trimmed traceback; with `brief`,
        the type and the first line of the message only. Returns its block."""
        state = getattr(exc, "pgcode", None)
        message = [ln.replace("\t", "  ").rstrip() for ln in (str(exc).strip() or repr(exc)).splitlines()[:8]]
        tb = trimmed_traceback(exc, self.verbose)
        self.wrapped(f"{error_type(exc)}" + (f"  (SQLSTATE {state})" if state else ""), PROSE, PROSE + "  ",
                     "bad", section)
        for text_line in message[:1] if brief else message:
            body = text_line.lstrip()
            lead = " " * (len(text_line) - len(body))
            self.wrapped(body, f"{PROSE}| {lead}", f"{PROSE}| {lead}  ", None, section)
        if not brief:
            for tb_line in tb:  # a pointer into the code: cut, not wrapped, when too wide
                ln, cut = self.text(PROSE + tb_line), self.text("…")
                self.line(ln if len(ln) <= self.width else ln[:self.width - len(cut)] + cut, "dim", section)
        return self.block(section, "error", type=error_type(exc), sqlstate=state, message="\n".join(message),
                          traceback=tb)
