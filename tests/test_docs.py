"""The README and the facilitator's guide, held to the code: the scenario ids and counts they
write, the flags their commands use, and the guide's sections a workshop leans on. No database:
the lessons are imported for their registry, and the parsers answer `--help`.

Each check is a function of the text. Every test runs it on the real document, where it must
find nothing, and on a copy broken the way the document could drift, where it must find that:
so no check here passes whatever the text says."""
from __future__ import annotations

import functools
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

from markdown_it import MarkdownIt

from conftest import ROOT, clean_env

from common.lab import ORDER

README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "FACILITATOR.md"
WORDS = {w: n for n, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve "
                                    "thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty "
                                    "twenty-one".split())}
NUMBER = r"(\d+|" + "|".join(sorted(WORDS, key=len, reverse=True)) + r")"
EARLIER_LAB = 16  # the lab before its five newer scenarios; a figure measured then says so
EARLIER_PER_SCRIPT = 4  # its scenarios a lesson, then


def number(word: str) -> int:
    return int(word) if word.isdigit() else WORDS[word.lower()]


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# --- the code's side: the registry and the parsers ---------------------------------------------

@functools.lru_cache(maxsize=None)
def registry() -> dict[str, list]:
    """script -> its ScenarioSpecs, in the lesson's order (imported: the lessons' own registry)."""
    from common.scenario import _REGISTRY

    modules = [importlib.import_module(Path(script).stem) for script in ORDER]
    return {f"{m.__name__}.py": [s for s in _REGISTRY if s.fn.__module__ == m.__name__] for m in modules}


def all_ids() -> list[str]:
    return [spec.id for specs in registry().values() for spec in specs]


def detector_exercises() -> dict[str, set[str]]:
    """scenario id -> the fix slots its root cause runs as its detector (`detect=s.fix("slot")`,
    in the scenario or a helper of its lesson; a detector's slot is one scenario's): the scenarios
    whose detector a student writes."""
    found = {}
    for specs in registry().values():
        for spec in specs:
            lesson = inspect.getsource(inspect.getmodule(spec.fn))
            slots = set(re.findall(r"""detect=s\.fix\(["'](\w+)["']\)""", lesson))
            if slots & {f.slot for f in spec.fixes}:
                found[spec.id] = slots & {f.slot for f in spec.fixes}
    return found


@functools.lru_cache(maxsize=None)
def parser_flags(script: str) -> frozenset[str]:
    """The long options of a script's parser, from its own --help (what a user would read)."""
    proc = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                          timeout=60, env=clean_env(), cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr
    return frozenset(re.findall(r"(?<![\w-])--[a-z][\w-]*", proc.stdout)) - {"--help"}


def flags_of(command: str) -> frozenset[str]:
    """The parser a documented command meets: `fail_X.py` stands for any lesson, so it gets the
    flags every lesson takes."""
    if command == "fail_X.py":
        return functools.reduce(frozenset.__and__, (parser_flags(s) for s in ORDER))
    return parser_flags(command)


# --- the documents' side -----------------------------------------------------------------------

def tokens(text: str) -> list:
    return MarkdownIt("commonmark").enable("table").parse(text)


def sections(text: str) -> list[tuple[int, str, str]]:
    """(level, title, body) of every heading; the body runs to the next heading of its level or
    above (so a section holds its subsections)."""
    lines = text.splitlines()
    toks = tokens(text)
    heads = [(int(t.tag[1]), toks[i + 1].content, t.map[0], t.map[1]) for i, t in enumerate(toks)
             if t.type == "heading_open"]
    out = []
    for n, (level, title, _, end) in enumerate(heads):
        stop = next((start for lv, _, start, _ in heads[n + 1:] if lv <= level), len(lines))
        out.append((level, title, "\n".join(lines[end:stop])))
    return out


def section(text: str, title: str) -> str:
    found = [body for _, t, body in sections(text) if t == title]
    assert len(found) == 1, (title, [t for _, t, _ in sections(text)])
    return found[0]


def code_texts(text: str) -> list[str]:
    """Every code span and every line of every fenced block: where the documents show commands."""
    out = []
    for tok in tokens(text):
        if tok.type == "fence":
            out += tok.content.splitlines()
        for child in tok.children or ():
            if child.type == "code_inline":
                out.append(child.content)
    return out


COMMAND = re.compile(r"(?:\.venv/bin/python|\.venv\\Scripts\\python)\s+(fail_\w+\.py|lab\.py)\b([^#;|&]*)")


def commands(text: str) -> list[tuple[str, list[str]]]:
    """(script, the flags written after it) of every fail_*.py and lab.py command shown."""
    return [(m.group(1), re.findall(r"(?<![\w-])--[a-z][\w-]*", m.group(2)))
            for code in code_texts(text) for m in COMMAND.finditer(code)]


def code_ids(text: str) -> set[str]:
    return {c.strip() for c in code_texts(text)}


def table_rows(body: str) -> list[list[str]]:
    """The cells of a section's table rows (inline text, code spans unwrapped), header excluded."""
    rows, row, cell, inside = [], None, None, False
    for tok in tokens(body):
        if tok.type == "tbody_open":
            inside = True
        elif tok.type == "tr_open" and inside:
            row = []
        elif tok.type == "td_open" and row is not None:
            cell = []
        elif tok.type == "inline" and cell is not None:
            cell.append(tok.content)
        elif tok.type == "td_close" and row is not None:
            row.append(" ".join(cell))
            cell = None
        elif tok.type == "tr_close" and row is not None:
            rows.append(row)
            row = None
    return rows


# --- the checks: each returns what drifted, empty when the document holds ----------------------

def missing_ids(text: str, ids) -> list[str]:
    shown = code_ids(text)
    return [i for i in ids if i not in shown]


def readme_script_tables(text: str) -> list:
    """Each lesson's table under "What each script covers" lists its scenarios, in order."""
    covers = section(text, "What each script covers")
    drift = []
    for script, specs in registry().items():
        ids = [re.sub(r"`", "", row[0]).strip() for row in table_rows(section(covers, script))]
        if ids != [s.id for s in specs]:
            drift.append((script, ids))
    return drift


def plans_that_skip_a_scenario(text: str) -> list:
    """A timing plan that says it shows every scenario must name each one."""
    plans = [(t, body) for level, t, body in sections(section(text, "Timing plans")) if level == 3]
    assert any("every scenario" in t for t, _ in plans), [t for t, _ in plans]
    return [(t, missing_ids(body, all_ids())) for t, body in plans
            if "every scenario" in t and missing_ids(body, all_ids())]


def plans_that_miscount_what_they_leave_out(text: str) -> list:
    """"The N scenarios not shown": N is the registry's count less the ids the plan's table names."""
    drift = []
    for level, title, body in sections(section(text, "Timing plans")):
        for m in re.finditer(r"\b" + NUMBER + r"\s+scenarios\s+not\s+shown", body, re.I):
            shown = {i for i in all_ids() if i in code_ids(body)}
            if number(m.group(1)) != len(all_ids()) - len(shown):
                drift.append((title, m.group(0), len(all_ids()) - len(shown)))
    return drift


def miscounts(text: str) -> list:
    """Every count of scenarios the text writes: "all 21", "21 scenarios", "21 passed" equal the
    registry's total; "(5 scenarios)" in a row naming a lesson equals that lesson's; "Scenario 2 of
    6" after `--only ID` is that scenario's place in its lesson. The earlier 16-scenario lab may be
    named only as earlier or first."""
    total, drift = len(all_ids()), []
    flat = " ".join(text.split())
    # "all 21 scenarios", "all 21 exercises", "lists all 21 |": not "all 3 distinct errors", "all four scripts"
    for m in re.finditer(r"\ball\s+" + NUMBER + r"(?=\s+(?:scenarios|exercises)\b|\s*[^\w\s])", flat, re.I):
        if number(m.group(1)) != total:
            drift.append(m.group(0))
    for m in re.finditer(r"\b" + NUMBER + r"\s+(?:scenarios\b|passed,)", flat, re.I):
        n, before, after = number(m.group(1)), flat[max(0, m.start() - 60):m.start()], flat[m.end():m.end() + 30]
        if re.match(r"\s*not shown\b", after) or re.search(r"\bin\s*$", before):
            continue  # a plan's leftovers, and "in four scenarios (ids)": counted by their own checks
        if re.search(r"\(\s*$", before):
            continue  # "(5 scenarios)": one lesson's, checked in its table row below
        if n == EARLIER_LAB and (re.search(r"\b(earlier|first)\b", before, re.I) or re.match(r"\s*then\b", after)):
            continue  # the lab before its newer scenarios, named as such
        if n == total - EARLIER_LAB and re.match(r"\s*added since\b", after):
            continue  # "the five scenarios added since"
        if n != total:
            drift.append(m.group(0))
    for line in text.splitlines():  # the speed table's "(5 scenarios)", "(6)" per lesson
        m = re.match(r"\|\s*`(fail_\w+\.py)`\s*\((\d+)(?: scenarios)?\)", line)
        if m and int(m.group(2)) != len(registry()[m.group(1)]):
            drift.append(line[:60])
    for m in re.finditer(r"`--only (\w+)` still says \"Scenario (\d+) of (\d+)\"", flat):
        place = [(n, len(specs)) for specs in registry().values()
                 for n, spec in enumerate(specs, 1) if spec.id == m.group(1)]
        if place != [(int(m.group(2)), int(m.group(3)))]:
            drift.append(m.group(0))
    return drift


def classroom_drift(text: str) -> list:
    """The classroom table's scenario totals (passed / failed / skipped) are a loop of the lab as it
    is, per student, or the section says they were measured with the earlier 16-scenario lab."""
    body = section(text, "A classroom on one server")
    earlier = re.search(rf"earlier\s+lab\s+of\s+{EARLIER_LAB}\s+scenarios", body) is not None
    retry = len(registry()["fail_retry_exhaustion.py"])
    rows = [r for r in table_rows(body) if re.search(r"\d+ / \d+ / \d+", " ".join(r))]
    drift = []
    for row in rows:
        students = int(re.match(r"\s*(\d+)", row[1]).group(1))
        counts = [int(x) for x in re.search(r"(\d+) / (\d+) / (\d+)", " ".join(row)).groups()]
        now, then = (retry, EARLIER_PER_SCRIPT) if "retry script only" in row[1] else (len(all_ids()), EARLIER_LAB)
        if sum(counts) != students * now and not (earlier and sum(counts) == students * then):
            drift.append(row[:3])
    return drift if rows else ["no classroom table"]


def unknown_flags(text: str) -> list:
    """Every --flag written after a fail_*.py or lab.py command is one its parser takes."""
    return [(script, flag) for script, flags in commands(text) for flag in flags
            if flag not in flags_of(script)]


def flag_table_drift(text: str) -> tuple[set, set]:
    """The README's "Command line" table is every lesson's flags, neither more nor fewer."""
    rows = table_rows(section(text, "Command line"))
    written = {f for row in rows for f in re.findall(r"(?<![\w-])--[a-z][\w-]*", row[0])}
    return written - flags_of("fail_X.py"), flags_of("fail_X.py") - written


def detection_drift(text: str) -> list:
    """The guide's "Detection in the room" names the scenarios whose check is the exercise, and
    counts them: exactly the scenarios whose root cause runs a fix slot as its detector."""
    body = " ".join(section(text, "Detection in the room").split())
    m = re.search(r"in " + NUMBER + r" scenarios \(([^)]*)\), a check that is itself the exercise", body)
    if not m:
        return ["no sentence naming the scenarios whose check is the exercise"]
    named = [x.strip() for x in m.group(2).split(",")]
    drift = [] if number(m.group(1)) == len(named) else [f"{m.group(1)} scenarios, {len(named)} named"]
    if set(named) != set(detector_exercises()):
        drift.append((sorted(named), sorted(detector_exercises())))
    return drift


def readme_detection_drift(text: str) -> list:
    """The README's detector table: every scenario once, under its lesson, and "(an exercise)"
    exactly where the detector is a fix slot, named by its slot or its fixed function."""
    drift, seen = [], []
    exercises = detector_exercises()
    specs = {spec.id: (script, spec) for script, ss in registry().items() for spec in ss}
    for script_cell, ids_cell, detector in table_rows(section(text, "Detection and alerting, proven like the fixes")):
        for sid in [re.sub(r"`", "", x).strip() for x in ids_cell.split(",")]:
            seen.append(sid)
            if sid not in specs or script_cell.strip() not in specs[sid][0]:
                drift.append((script_cell, sid))
                continue
            names = {f.slot for f in specs[sid][1].fixes if f.slot in exercises.get(sid, ())}
            names |= {f.fixed.__name__ for f in specs[sid][1].fixes if f.slot in names}
            is_exercise = "(an exercise)" in detector
            if is_exercise != (sid in exercises) or (is_exercise and not any(f"`{n}`" in detector for n in names)):
                drift.append((sid, detector))
    if sorted(seen) != sorted(specs):
        drift.append(("the table's scenarios", sorted(set(specs) ^ set(seen))))
    return drift


WORKSHOP_SECTIONS = ("Detection in the room", "Troubleshooting", "A scenario fails live", "Installing a room",
                     "In a room")


def empty_sections(text: str) -> list[str]:
    """The sections a workshop leans on are there and say something (a paragraph or a list of
    several sentences, not a heading alone)."""
    present = {t: body for _, t, body in sections(text)}
    return [t for t in WORKSHOP_SECTIONS if len(re.findall(r"\w+", present.get(t, ""))) < 40]


def exercise_before_reveal(text: str) -> list[str]:
    """"In a room" tells the facilitator to give the exercise before the reveal: stop before
    ✅ Prevention, then start the exercise; its commands are the lessons' own."""
    body = " ".join(section(text, "In a room").split())
    drift = [] if re.search(r"Give the exercise before the reveal: .*✅ Prevention.*start the exercise", body) \
        else ["no step giving the exercise before the reveal"]
    return drift + [f for _, f in unknown_flags(section(text, "In a room"))]


def readme_sections_the_guide_names(text: str) -> list[str]:
    """The guide sends the reader to the README's sections by name: those sections exist."""
    titles = {t for _, t, _ in sections(read(README))}
    named = re.findall(r"the README's \"([^\"]+)\"", " ".join(text.split()))
    assert named
    return [n for n in named if n not in titles]


def lab_seconds(readme: str, guide: str) -> tuple[float, int] | None:
    """The guide's "about N seconds" for the whole lab is the README's measured warm loop."""
    m = re.search(r"the whole loop of four scripts, warm \| ([\d.]+) s", readme)
    g = re.search(r"all \d+ scenarios \(about (\d+) seconds", " ".join(guide.split()))
    assert m, "the README's Speed table has no warm loop"
    if not g or abs(int(g.group(1)) - float(m.group(1))) > 1:
        return float(m.group(1)), int(g.group(1)) if g else None
    return None


# --- the tests ---------------------------------------------------------------------------------

def test_the_registry_is_what_the_scripts_list():
    """The registry these checks read is the one a user sees through --list."""
    listed = []
    for script in ORDER:
        out = subprocess.run([sys.executable, str(ROOT / script), "--list"], capture_output=True, text=True,
                             timeout=60, env=clean_env(), cwd=str(ROOT)).stdout
        listed += [line.split()[0] for line in out.splitlines() if line.strip()]
    assert listed == all_ids() and len(listed) == len(set(listed)) > 0


def test_the_readme_names_every_scenario_in_its_lessons_table():
    text = read(README)
    assert missing_ids(text, all_ids()) == []
    assert readme_script_tables(text) == []
    broken = text.replace("| `hung_attempt` |", "| `hung` |")
    assert missing_ids(broken, all_ids()) == ["hung_attempt"]
    assert readme_script_tables(broken) != []


def test_every_plan_that_shows_every_scenario_names_each_one():
    text = read(GUIDE)
    assert missing_ids(text, all_ids()) == []
    assert plans_that_skip_a_scenario(text) == []
    broken = text.replace(", `poison_job`, `hung_attempt` |", " |")
    assert [ids for _, ids in plans_that_skip_a_scenario(broken)] == [["poison_job", "hung_attempt"]]


def test_the_tour_counts_the_scenarios_it_leaves_out():
    text = read(GUIDE)
    assert plans_that_miscount_what_they_leave_out(text) == []
    assert re.search(r"\bscenarios\s+not\s+shown", text)  # the check has something to count
    broken = re.sub(r"\bthirteen(\s+scenarios\s+not\s+shown)", r"eight\1", text)
    assert plans_that_miscount_what_they_leave_out(broken) != []


def test_the_counts_written_in_the_readme_and_the_guide_are_the_registrys():
    for doc in (README, GUIDE):
        text = read(doc)
        assert miscounts(text) == [], doc.name
    total = len(all_ids())
    for broken in (f"Run the whole lab, all four scripts and their {total - 5} scenarios",
                   f"a count line, `{total - 5} passed, 0 failed`",
                   "| `fail_retry_exhaustion.py` (4) | 1 s |",
                   '`--only storm` still says "Scenario 2 of 4"',
                   "measured with 16 scenarios"):
        assert miscounts(broken) != [], broken


def test_the_classroom_figures_are_of_this_lab_or_say_they_are_of_the_earlier_one():
    text = read(README)
    assert classroom_drift(text) == []
    assert classroom_drift(text.replace("with the earlier\nlab of 16 scenarios", "with the\nlab")) != []
    assert classroom_drift(text.replace("| 30 | 3 | 48 / 0 / 0 |", "| 30 | 3 | 47 / 0 / 0 |")) != []


def test_every_flag_a_command_shows_is_one_its_parser_takes():
    for doc in (README, GUIDE):
        text = read(doc)
        assert len(commands(text)) > 10, doc.name  # the documents show commands, and they are read
        assert unknown_flags(text) == [], doc.name
    assert unknown_flags("`.venv/bin/python lab.py --exercise storm`") == [("lab.py", "--exercise")]
    assert unknown_flags("`.venv/bin/python fail_X.py --only ID --pasue`") == [("fail_X.py", "--pasue")]
    assert unknown_flags("```bash\n.venv/bin/python fail_retry_exhaustion.py --hints 2  # --x\n```") == \
        [("fail_retry_exhaustion.py", "--hints")]


def test_the_readmes_flag_table_is_every_flag_of_the_lessons():
    text = read(README)
    assert flag_table_drift(text) == (set(), set())
    assert flag_table_drift(text.replace("| `--metrics DIR` |", "| `--metric DIR` |")) == \
        ({"--metric"}, {"--metrics"})


def test_detection_in_the_room_names_the_scenarios_whose_check_is_the_exercise():
    text = read(GUIDE)
    assert detector_exercises()  # the code has such scenarios, so the comparison can fail
    assert detection_drift(text) == []
    assert detection_drift(text.replace("partial_failure, storm", "partial_failure, poison_job")) != []
    assert detection_drift(text.replace("in four scenarios", "in five scenarios")) != []


def test_the_readmes_detector_table_covers_every_scenario_and_marks_the_exercises():
    text = read(README)
    assert readme_detection_drift(text) == []
    assert readme_detection_drift(text.replace("| retry | hung_attempt |", "| retry | hung |")) != []
    assert readme_detection_drift(text.replace("check `find_login_storm` (an exercise)",
                                               "check `find_login_storm`")) != []


def test_the_guides_workshop_sections_are_there_and_say_something():
    text = read(GUIDE)
    assert empty_sections(text) == []
    assert exercise_before_reveal(text) == []
    assert readme_sections_the_guide_names(text) == []
    gone = re.sub(r"(### Installing a room\n).*?(\n## )", r"\1\2", text, flags=re.S)
    assert empty_sections(gone) == ["Installing a room"]
    assert empty_sections(text.replace("### Detection in the room", "### Detection")) == ["Detection in the room"]
    assert exercise_before_reveal(text.replace("Give the exercise before the reveal", "Give the exercise")) != []
    assert readme_sections_the_guide_names(text.replace("README's \"A classroom on one server\"",
                                                        "README's \"A classroom\"")) != []


def test_the_guide_times_the_lab_as_the_readme_measured_it():
    readme, guide = read(README), read(GUIDE)
    assert lab_seconds(readme, guide) is None
    assert lab_seconds(readme, re.sub(r"(all \d+ scenarios \(about )\d+( seconds)", r"\g<1>20\2", guide)) is not None
