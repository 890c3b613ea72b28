"""Instructor features: --pause on a terminal (and never off one), --keep, --brief, --report as a
Markdown handout."""
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest
from markdown_it import MarkdownIt

from conftest import ROOT, clean_env, lab_schemas, run_script

QUICK = ["fail_checkpoint_corruption.py", "--only", "concurrent_access"]


def test_report_is_markdown_that_parses_into_headings_tables_and_code(embedded_params, tmp_path):
    handout = tmp_path / "handout.md"
    result = run_script(*QUICK, "--report", str(handout), tmp_path=tmp_path)
    assert result.returncode == 0
    text = handout.read_text(encoding="utf-8")
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    headings = [(t.tag, tokens[i + 1].content) for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert headings[0] == ("h1", "fail_checkpoint_corruption.py")
    assert ("h2", "3. Concurrent checkpoint access (concurrent_access)") in [(t, c.replace("`", "")) for t, c in headings]
    assert [c for t, c in headings if t == "h3"] == ["Description", "Trigger", "Error", "Root cause",
                                                      "Recovery", "Prevention", "For discussion"]
    # no character that needs an emoji font (the headings were empty boxes without one)
    assert not [ch for ch in text if ord(ch) > 0xFFFF or 0x1F000 <= ord(ch) or ch == "\ufe0f"]
    assert sum(t.type == "table_open" for t in tokens) >= 3  # summary, errors observed, measured
    fences = [t for t in tokens if t.type == "fence"]
    assert {f.info for f in fences} <= {"python", "sql", "text"} and "python" in {f.info for f in fences}
    assert "40001" in next(f.content for f in fences if "SerializationFailure" in f.content)
    record = result.scenario("concurrent_access")
    assert f"> **Lesson:** " in text and record["lesson"].split()[0] in text.split("> **Lesson:** ")[1]
    items = [t for t in tokens if t.type == "list_item_open"]
    assert items and len(record["questions"]) >= 2  # the discussion questions, as a list
    assert all(q in text for q in record["questions"])
    assert "| figure | value |" in text


def drive_in_pty(args, answer: bool, think: float = 0.0, size: tuple[int, int] | None = None,
                 limit: float = 60, group: bool = False, cwd=None) -> tuple[str, int, float]:
    """Run on a pseudo-terminal (stdin and stdout) of `size` (columns, rows); press Enter at each
    prompt if `answer`, after `think` seconds (the room thinking). Otherwise press Ctrl-C at the
    first prompt: SIGINT to the process, or with `group` to its whole process group, as a
    terminal sends it; then read what it prints until it ends."""
    leader, follower = pty.openpty()
    if size:
        import fcntl
        import struct
        import termios

        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", size[1], size[0], 0, 0))
    env = {k: v for k, v in clean_env(NO_COLOR="1").items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen([sys.executable, str(ROOT / args[0]), *args[1:]], env=env, cwd=cwd,
                            stdin=follower, stdout=follower, stderr=follower, start_new_session=group)
    os.close(follower)
    seen, started, deadline = b"", time.monotonic(), time.monotonic() + limit
    interrupted = False
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
            if answer and seen.endswith(b") "):  # the prompt, "(Enter for ...) ", waits on its line
                time.sleep(think)
                os.write(leader, b"\n")
        elif proc.poll() is not None:
            break
        elif not answer and not interrupted and time.monotonic() - started > 8:
            interrupted = True  # waiting for an Enter that will not come: Ctrl-C, then read the rest
            os.killpg(proc.pid, signal.SIGINT) if group else proc.send_signal(signal.SIGINT)
    if proc.poll() is None and not interrupted:
        proc.send_signal(signal.SIGINT)  # Ctrl-C at the prompt: cleans up and exits 130
    proc.wait(60)
    os.close(leader)
    return seen.decode("utf-8", "replace"), proc.returncode, time.monotonic() - started


def sections(text: str) -> int:
    """The prompts before a section (not those before a step, more text, or the summary)."""
    return text.count("(Enter for") - sum(text.count(f"(Enter for {w})") for w in
                                          ("the next step", "more", "the summary"))


@pytest.mark.slow  # waits for an Enter on purpose
def test_pause_waits_for_enter_before_each_section_on_a_terminal(embedded_params):
    text, code, _ = drive_in_pty([*QUICK, "--pause"], answer=True, size=(100, 60))
    assert code == 0, text[-2000:]
    assert sections(text) == 6
    waiting, code, _ = drive_in_pty([*QUICK, "--pause"], answer=False)
    assert code == 130 and waiting.count("(Enter for") == 1  # it really stops at the first prompt


def test_pause_is_ignored_without_a_terminal(embedded_params, tmp_path):
    result = run_script(*QUICK, "--pause", tmp_path=tmp_path)  # stdin is not a terminal
    assert result.returncode == 0 and "(Enter for" not in result.stdout


@pytest.mark.slow  # waits for an Enter on purpose
def test_time_waiting_for_enter_is_not_the_scenarios_time(embedded_params, tmp_path):
    journal = tmp_path / "paused.json"
    text, code, wall = drive_in_pty([*QUICK, "--pause", "--json", str(journal)], answer=True, think=1.0,
                                    size=(100, 60))
    assert code == 0, text[-2000:]
    record = json.loads(journal.read_text())["scenarios"][0]
    assert sections(text) == 6
    assert record["paused_seconds"] >= 6 * 0.99  # six prompts, each answered a second later at the earliest
    assert record["seconds"] <= wall - record["paused_seconds"]
    assert "Scenario 3 of 5" in text  # --only keeps the scenario's number in the script


def test_keep_prints_what_to_type_and_the_drop_command_of_every_kept_schema(embedded_params, tmp_path):
    ids = "concurrent_access,corruption"
    result = run_script("fail_checkpoint_corruption.py", "--only", ids, "--keep", tmp_path=tmp_path)
    kept = [r["kept"] for r in result.journal["scenarios"]]
    try:
        assert result.returncode == 0, result.stdout[-3000:]
        assert sorted(kept) == sorted(lab_schemas(embedded_params, result.journal["run_id"]))
        out = result.stdout
        for name in kept:
            assert f"DROP SCHEMA {name} CASCADE;" in out and f"kept {name}" in out
        assert "cleaned ✔" not in out
        # the interpreter that runs, as typed from where the user is (tmp_path: not below it, so absolute)
        assert f"{os.path.abspath(sys.executable)} {ROOT / 'code' / 'init_schemas.py'} --psql" in out
    finally:
        from common import db
        conn = db.connect(embedded_params, autocommit=True)
        for name in kept:
            db.drop_schema(conn, name)
        conn.close()


def test_brief_shows_the_essentials_and_the_handout_stays_complete(embedded_params, tmp_path):
    full = run_script(*QUICK, tmp_path=tmp_path)
    handout = tmp_path / "brief.md"
    brief = run_script(*QUICK, "--brief", "--report", str(handout), tmp_path=tmp_path)
    assert full.returncode == brief.returncode == 0, brief.stdout[-3000:]
    f, b = full.journal["scenarios"][0], brief.journal["scenarios"][0]
    def shown(record):
        return sum(len(text.splitlines()) for text in record["sections"].values())

    assert shown(b) < 0.8 * shown(f)
    for section in ("description", "trigger", "error", "root_cause", "recovery", "prevention"):
        assert b["sections"][section].strip(), section  # every section still shows something
    shown = " ".join(brief.stdout.split())
    assert all(" ".join(c["claim"].split()) in shown for c in b["checks"])  # the proof: every check
    assert "SerializationFailure" in b["sections"]["recovery"] and "Traceback" not in brief.stdout
    assert b["lesson"] and b["lesson"] in " ".join(b["sections"]["prevention"].split())
    assert "def " not in b["sections"]["prevention"] and "def " in f["sections"]["prevention"]
    assert "def " in handout.read_text()  # the handout keeps the code


def test_pause_shows_no_reveal_taller_than_the_terminal(embedded_params):
    """A projector's terminal, 100 x 30, the presenter's mode: a long section waits for Enter
    before each step (and any text about to fill the screen waits too), so between two prompts
    there is never more than the screen holds, with the last prompt and the next one."""
    rows = 30
    text, code, _ = drive_in_pty(["lab.py", "--brief", "--pause"], answer=True, size=(100, rows), limit=600)
    assert code == 0, text[-3000:]
    reveals = [chunk.replace("\r", "").split("\n") for chunk in text.split("(Enter for")]
    assert len(reveals) > 16 * 6 and "(Enter for the next step)" in text  # the steps of long sections
    tallest = max(len(lines) for lines in reveals[1:])  # from one prompt's line to the next one's
    assert tallest <= rows, max(reveals[1:], key=len)
    assert max(len(ln) for lines in reveals for ln in lines) <= 100 + len(" (Enter for more) ")


def test_every_command_in_the_readme_and_the_guide_names_the_venvs_interpreter():
    import re

    for doc in (ROOT / "README.md", ROOT / "docs" / "FACILITATOR.md"):
        text = doc.read_text(encoding="utf-8")
        bare = [m.group(0) for m in re.finditer(r"(?<![\w./\\-])python3? +(?:-m +(?!venv)\w+|[\w./-]+\.py)", text)]
        assert not bare, (doc.name, bare)
        # a script with flags, in a code span, is a command too: it starts with the interpreter
        spans = re.findall(r"`((?:fail_\w+|lab|code/\w+|bench/\w+)\.py [^`]*)`", text)
        assert not spans, (doc.name, spans)


def test_the_readmes_first_command_is_the_whole_lab_with_one_summary_and_one_status():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first = text.split("```bash", 1)[1].split("```", 1)[0].strip()
    assert first.endswith(".venv/bin/python lab.py") and "for s in" not in first
    after = " ".join(text.split(first, 1)[1].split("## ", 1)[0].split())
    assert "Lab summary" in after and "exit status" in after and "What to look at" in after
