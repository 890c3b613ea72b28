"""What a room reads: every scenario of the four scripts, rendered as on a projector that is not a
terminal (80 columns), fits 80 columns without the console's fallback for code, and its human text
holds no Python repr (dicts, lists, tuples, None), outside code blocks and real error messages.

The scan covers all of stdout; the only lines it skips are those the journal's blocks say are code
or an exception (the lesson's source, SQL, tracebacks, the server's own message), and it proves it
read the rest (enough lines per scenario, every section), so it cannot pass by reading nothing."""
from __future__ import annotations

import re

import pytest

from conftest import lesson_scenarios, run_script


def count_of(script: str) -> int:
    return sum(s == script for s, _ in lesson_scenarios())
from common.output import CONTINUED

SCRIPTS = ["fail_checkpoint_corruption.py", "fail_idempotency_break.py", "fail_retry_exhaustion.py",
           "fail_logging_failure.py"]
WIDTH = 80

# What a Python repr looks like in running text, and nothing else: a quoted key or item after a
# bracket, a quoted key before a colon, a quoted item after a comma, a tuple or list of numbers,
# None used as a value (not "None of the rows"), and the reprs of common objects.
REPR = [
    (r"[\[{(]'", "a quoted item right after a bracket: {'a'... ['a'... ('a'..."),
    (r"'[^'\s]{1,40}': ", "a quoted dict key: 'key': value"),
    (r"\w', '\w", "quoted items separated by a comma: 'a', 'b'"),
    (r"(?<!\w)[(\[]-?\d+(?:\.\d+)?(?:, -?\d+(?:\.\d+)?)+[)\]]", "a tuple or list of numbers: (32, 32), [1, 2]"),
    (r"(?:(?<=[\w=:,(\[])\s*|^\s*)None\b(?!\s+(?:of|were|was|is|are|left|lost|at|in)\b)", "None as a value"),
    (r"\{\}|\[\]|\bset\(\)", "an empty container: {} [] set()"),
    (r"\b(?:Decimal|datetime\.\w+|frozenset|defaultdict|OrderedDict|Counter|dict_(?:keys|values|items))\(",
     "an object's repr: Decimal(...), datetime...(...)"),
    (r"<[\w.]+ (?:object )?at 0x[0-9a-f]+", "an object's address: <... at 0x...>"),
    (r"(?<![\w'])b'", "a bytes literal: b'...'"),
]
_REPR = [(re.compile(p), why) for p, why in REPR]


def repr_leaks(line: str) -> list[str]:
    """The reasons a line of human text looks like it holds a Python repr (empty: it does not)."""
    return [why for rx, why in _REPR if rx.search(line)]


def _normal(text: str) -> str:
    return " ".join(text.replace(f"{CONTINUED} ", "").replace("| ", " ").split())


def literal_text(record: dict) -> str:
    """Everything of a scenario that is shown verbatim: code and exceptions, whitespace-normalised."""
    parts = []
    for blocks in (record.get("blocks") or {}).values():
        for b in blocks:
            if b["kind"] == "code":
                parts.append(b["text"])
            elif b["kind"] == "error":
                parts += [b["type"], b.get("message") or "", "\n".join(b.get("traceback") or [])]
    return _normal("\n".join(parts))


def by_scenario(stdout: str) -> dict[str, list[str]]:
    """stdout cut at each 'Scenario N of M: title  [id]' header; the id's lines up to the next."""
    out: dict[str, list[str]] = {}
    current, lines = None, stdout.splitlines()
    for n, line in enumerate(lines):
        if re.match(r"\s+Scenario \d+ of \d+: ", line):  # a long title wraps: its [id] ends the next line
            m = re.search(r"\[(\w+)\]$", line) or re.search(r"\[(\w+)\]$", lines[n + 1])
            current = m.group(1)
            out[current] = [line]
        elif line.strip() == "Summary" or line.startswith("Kept for inspection"):
            current = None
        elif current:
            out[current].append(line)
    return out


@pytest.fixture(scope="module")
def rendered(embedded_params, tmp_path_factory):
    """Every script run once as a room sees it (not a terminal: 80 columns), with its journal."""
    runs = {}
    for script in SCRIPTS:
        result = run_script(script, tmp_path=tmp_path_factory.mktemp(script[:-3]))
        assert result.journal is not None, f"{script}: no journal\n{result.stderr[-2000:]}"
        runs[script] = result
    return runs


def test_the_checker_finds_reprs_and_leaves_prose_alone():
    leaks = ["removed {'orders_v1': 2000, 'orders_v2': 434}", "workers: {'full jitter': (32, 32), ...}",
             "announced None", "keys ['a', 'b']", "peaks (41, 32)", "total Decimal('12.50')",
             "value = None", "got <Future at 0x7f3a2b1c state=finished>", "payload b'abc'", "rows {}"]
    for text in leaks:
        assert repr_leaks(text), text
    clean = ["None of the 64 rows was lost.", "the checkpoint says last_id = 1500", "store_id is NULL for web orders",
             'a JSON file, {"job": ..., "last_id": ...}', "ids 1001-1500 (500 rows)", "run it with reraise=True",
             "ON CONFLICT (store_id, order_ref) DO NOTHING", "duplicated 0, missing 0", "the student's code",
             "amount numeric(10, 2)"]
    for text in clean:
        assert not repr_leaks(text), (text, repr_leaks(text))


def _width_failures(result) -> dict[str, list[str]]:
    failures: dict[str, list[str]] = {}
    for sid, lines in by_scenario(result.stdout).items():
        bad = [f"{len(ln)} columns: {ln.strip()[:100]}" for ln in lines if len(ln) > WIDTH]
        for n, ln in enumerate(lines):  # the console's fallback for code that does not fit
            if ln.lstrip().startswith(CONTINUED) and n:
                start = n - 1
                while start and lines[start].lstrip().startswith(CONTINUED):
                    start -= 1
                bad.append(f"code wider than {WIDTH - 6} (shown indented by 6), wrapped: "
                           f"{lines[start].strip()[:70]} ...")
        if bad:
            failures[sid] = sorted(set(bad), key=bad.index)
    return failures


# The lesson scripts are being brought within 80 columns; until each is, its case may fail (the
# failure lists each line still too wide, per scenario). Remove a script from here once it passes.
NOT_YET_80: set[str] = set()


@pytest.mark.slow
@pytest.mark.parametrize("script", [
    pytest.param(s, marks=pytest.mark.xfail(strict=False, reason="slot code and SQL wider than 74 columns, "
                                            "shown through the console's fallback"))
    if s in NOT_YET_80 else s for s in SCRIPTS])
def test_every_line_fits_80_columns_without_wrapping_code(rendered, script):
    result = rendered[script]
    scenarios = by_scenario(result.stdout)
    assert list(scenarios) == [r["id"] for r in result.journal["scenarios"]] and len(scenarios) == count_of(script)
    assert all(len(lines) > 20 for lines in scenarios.values())  # it read whole scenarios
    failures = _width_failures(result)
    assert not failures, "\n".join(f"[{sid}]\n  " + "\n  ".join(v) for sid, v in failures.items())
    assert max(len(ln) for ln in result.stdout.splitlines()) <= WIDTH


def _repr_failures(result) -> tuple[dict[str, list[str]], dict[str, int]]:
    failures, scanned = {}, {}
    records = {r["id"]: r for r in result.journal["scenarios"]}
    for sid, lines in by_scenario(result.stdout).items():
        literal = literal_text(records[sid])
        bad, n = [], 0
        for ln in lines:
            text = _normal(ln)
            if text.endswith("…") or text.endswith("..."):  # a traceback line cut to the width
                text = text.rstrip("….").rstrip()
            if not text or text in literal:
                continue  # code or a real exception's own text, shown verbatim
            n += 1
            if repr_leaks(ln):
                bad.append(f"{'; '.join(repr_leaks(ln))}: {ln.strip()[:110]}")
        scanned[sid] = n
        if bad:
            failures[sid] = bad
    return failures, scanned


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_no_python_repr_in_human_output(rendered, script):
    result = rendered[script]
    failures, scanned = _repr_failures(result)
    assert len(scanned) == count_of(script) and all(n >= 15 for n in scanned.values()), scanned  # not vacuous
    for record in result.journal["scenarios"]:
        assert all(record["sections"][k].strip() for k in record["sections"]), record["id"]
    assert not failures, "\n".join(f"[{sid}]\n  " + "\n  ".join(v) for sid, v in failures.items())
