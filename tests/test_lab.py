"""The whole lab in one command (lab.py): the four scripts in order, one summary of all
scenarios, one exit status, one combined journal and one combined handout, and the handout as a
reader sees it in a real browser."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

from conftest import ROOT, clean_env, declared_fixes, lab_schemas, lesson_scenarios

SCENARIOS = len(lesson_scenarios())  # every scenario of the four lessons

from common.lab import ORDER, lab_exit_code

sys.path.insert(0, str(Path(__file__).parent))
import browser  # noqa: E402


@pytest.fixture(scope="module")
def lab(embedded_params, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lab")
    proc = subprocess.run([sys.executable, str(ROOT / "lab.py"), "--json", str(folder / "lab.json"),
                           "--report", str(folder / "lab.md")], env=clean_env(), cwd=str(folder),
                          capture_output=True, text=True, timeout=480, encoding="utf-8", errors="replace")
    journal = json.loads((folder / "lab.json").read_text(encoding="utf-8"))
    return proc, journal, folder / "lab.md"


@pytest.mark.slow
def test_one_command_runs_the_four_scripts_in_order_with_one_summary_and_one_status(lab, embedded_params):
    proc, journal, _ = lab
    assert proc.returncode == 0 == journal["exit_code"], proc.stdout[-3000:] + proc.stderr[-2000:]
    assert [j["script"] for j in journal["scripts"]] == list(ORDER)
    records = [r for j in journal["scripts"] for r in j["scenarios"]]
    assert len(records) == SCENARIOS and all(r["status"] == "passed" for r in records)
    summary = proc.stdout.split(f"Lab summary: {SCENARIOS} scenario(s) in 4 script(s)")[1]
    assert all(r["id"] in summary for r in records) and f"{SCENARIOS} passed, 0 failed" in summary
    said = " ".join(summary.split())  # it ends by saying where to look, and what its status means
    assert "What to look at:" in said and "exit status 0: every scenario passed." in said
    assert sum(bool(r.get("headline")) for r in records) == SCENARIOS  # the headline figure of each
    for j in journal["scripts"]:  # each script ran with its own journal, and left nothing
        assert j["run_id"] and lab_schemas(embedded_params, j["run_id"]) == []


@pytest.mark.slow
def test_every_scenario_makes_every_claim_it_always_makes(lab):
    """A branch inverted or a step never run makes a claim fewer, though every claim made held."""
    import claims

    _, journal, _ = lab
    golden = json.loads(claims.GOLDEN.read_text(encoding="utf-8"))
    assert sorted(golden) == sorted(sid for _, sid in lesson_scenarios())  # every scenario has its claims
    assert claims.missing(journal, golden) == {}
    never = {sid: ["a claim no run makes"] for sid in claims.shapes(journal)}
    assert claims.missing(journal, never) == never  # the comparison can fail


@pytest.mark.slow
def test_the_lab_handout_holds_every_scenario_with_its_lesson_and_questions(lab):
    _, journal, handout = lab
    text = handout.read_text(encoding="utf-8")
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    heads = [(t.tag, tokens[i + 1].content) for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert heads[0] == ("h1", "Pipeline failure lab")
    assert [c for t, c in heads if t == "h2"] == list(ORDER)
    assert sum(t == "h3" for t, _ in heads) == SCENARIOS
    assert sum(c == "For discussion" for _, c in heads) == SCENARIOS and text.count("> **Lesson:** ") == SCENARIOS
    assert text.count("**Runbook** (") == SCENARIOS and "fired on the failure and was quiet after the fix" in text
    langs = {t.info for t in tokens if t.type == "fence"}
    assert {"python", "sql", "yaml"} <= langs <= {"python", "sql", "text", "yaml"}  # yaml: the alert rules
    for j in journal["scripts"]:  # the summary's links lead to their scenario
        short = j["script"].split("_")[1]
        for r in j["scenarios"]:
            assert f"(#{short}-{r['id']})" in text and f'<a id="{short}-{r["id"]}"></a>' in text
            # the scenario's own questions, not ones the handout makes up when it gives none
            assert 2 <= len(r["questions"]) <= 3 and all(q.endswith("?") for q in r["questions"]), r["id"]
            assert len(r["lesson"]) > 20, r["id"]
            assert_the_recovery_ends_with_the_detector_quiet(r)


def assert_the_recovery_ends_with_the_detector_quiet(record: dict) -> None:
    """🔧 ends with the detector run again on the recovered state, quiet: its last step, and the
    scenario's last claim."""
    check = record["detection"]["check"]
    steps = [b["text"] for b in record["blocks"]["recovery"] if b["kind"] == "step"]
    assert steps and steps[-1].startswith("Run the ") and check in steps[-1] and steps[-1].endswith(" again"), \
        (record["id"], steps[-2:])
    last = record["checks"][-1]
    assert (last["phase"], last["ok"], last["claim"]) == \
        ("recovered", True, f"the detector {check} is quiet after the recovery"), (record["id"], record["checks"][-3:])


def test_lab_exit_status_is_the_worst_of_its_scripts():
    assert lab_exit_code([0, 0, 0, 0]) == 0
    assert lab_exit_code([0, 1, 0, 0]) == 1
    assert lab_exit_code([0, 2]) == 2 and lab_exit_code([1, 130]) == 130


def test_an_unknown_script_is_a_clear_start_error():
    proc = subprocess.run([sys.executable, str(ROOT / "lab.py"), "--only", "nosuch"], env=clean_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no script matches nosuch" in proc.stderr


def _png_pixels_vary(png: bytes) -> tuple[int, int, int]:
    """(width, height, distinct byte values of the image data): a blank page has very few."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    data, at = b"", 8
    while at < len(png):
        length, kind = struct.unpack(">I4s", png[at:at + 8])
        if kind == b"IDAT":
            data += png[at + 8:at + 8 + length]
        at += 12 + length
    return width, height, len(set(zlib.decompress(data)))


@pytest.mark.slow
def test_the_handout_renders_in_a_real_browser(lab, tmp_path):
    chromium, why = browser.chromium()
    if chromium is None:
        pytest.skip(why)
    _, _, handout = lab
    page, png = tmp_path / "lab.html", tmp_path / "lab.png"
    page.write_text(browser.to_html(handout.read_text(encoding="utf-8")), encoding="utf-8")
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--disable-sync", "--no-first-run",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<table>") >= 16 and 'class="language-python"' in dom and 'class="language-sql"' in dom
    assert "<blockquote>" in dom and dom.count("<h3>") == SCENARIOS
    browser.screenshot(page, png)
    width, height, distinct = _png_pixels_vary(png.read_bytes())
    assert (width, height) == (1100, 2400) and distinct > 40, distinct  # a rendered page, not a blank one


def test_the_facilitators_guide_covers_every_scenario_by_number_id_and_title():
    import re

    guide = (ROOT / "docs" / "FACILITATOR.md").read_text(encoding="utf-8")
    listed = re.findall(r"^#### (\d+)\. `(\w+)`: (.+)$", guide, re.M)
    expected = []
    for script in ORDER:
        out = subprocess.run([sys.executable, str(ROOT / script), "--list"], capture_output=True, text=True,
                             timeout=60, env=clean_env()).stdout
        for n, line in enumerate(out.splitlines(), 1):
            sid, rest = line.split(None, 1)
            expected.append((str(n), sid, rest.replace("[exercise]", "").strip()))
    assert listed == expected


def test_lab_list_needs_no_database_and_marks_the_exercises():
    proc = subprocess.run([sys.executable, str(ROOT / "lab.py"), "--list"], capture_output=True, text=True,
                          timeout=60, env=clean_env(DATABASE_URL="postgresql://nobody@127.0.0.1:1/none"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [ln for ln in lines if not ln.startswith(" ")] == list(ORDER)
    assert sum(ln.startswith("   ") for ln in lines) == SCENARIOS and all("[exercise]" in ln for ln in lines if ln[:1] == " ")


def test_sigterm_to_the_lab_reaches_the_running_script_which_cleans_up(embedded_params, tmp_path):
    import signal

    journal = tmp_path / "lab.json"
    proc = subprocess.Popen([sys.executable, str(ROOT / "lab.py"), "--only", "checkpoint", "--json", str(journal)],
                            env=clean_env(), cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    seen = []
    for line in proc.stdout:  # the script is running once its first scenario starts
        seen.append(line)
        if "Scenario 1 of " in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    out = "".join(seen) + out
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    (script,) = json.loads(journal.read_text())["scripts"]
    assert script["exit_code"] == 130 and lab_schemas(embedded_params, script["run_id"]) == []


def test_the_headline_column_has_one_format():
    from common.report import headline_parts

    assert headline_parts({"headline": {"name": "rows_missing_before", "value": "500", "after": "0"}}) == \
        ("rows missing", "500 → 0")
    assert headline_parts({"headline": {"name": "naive_worst_case_s", "value": "4094"}}) == \
        ("naive worst case (s)", "4094")
    assert headline_parts({}) == ("", "")


def _lab(*args, tmp_path, **kw):
    return subprocess.run([sys.executable, str(ROOT / "lab.py"), *args], env=clean_env(), cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=kw.get("timeout", 60))


def test_lab_output_paths_and_flags_are_checked_before_the_run(tmp_path):
    import os

    fifo = tmp_path / "lab.fifo"
    os.mkfifo(fifo)
    for args in (["--json", str(tmp_path / "nowhere" / "lab.json")], ["--report", str(tmp_path)],
                 ["--json", str(fifo)], ["--report", str(fifo)], ["--json", "/dev/zero"],
                 ["--seed", "1.5"], ["--seed", "-1"], ["--only", "nosuch"], ["--exercise-dir", "x"]):
        proc = _lab(*args, tmp_path=tmp_path)  # a blocked open would hang: the timeout fails it
        assert proc.returncode == 2 and "Lab 1 of" not in proc.stdout, (args, proc.stdout[-500:])
        assert proc.stderr.count("\n") == 1, (args, proc.stderr)


def test_lab_progress_lists_all_sixteen_exercises_and_the_next_command(tmp_path):
    proc = _lab("--progress", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [ln.split() for ln in proc.stdout.splitlines() if ln.startswith("   ") and ln.rstrip().endswith("started")]
    assert len(rows) == SCENARIOS and all(r[-2:] == ["not", "started"] for r in rows)
    assert f"0 of {SCENARIOS} passed at their last grade" in proc.stdout
    assert max(len(ln) for ln in proc.stdout.split("next (start it):")[0].splitlines()) <= 80
    nxt = proc.stdout.split("next (start it):")[1].split()
    assert nxt[:4] == [sys.executable, str(ROOT / "fail_checkpoint_corruption.py"), "--exercise", "corruption"]


def test_sigint_to_the_lab_alone_stops_the_running_script_and_the_rest(embedded_params, tmp_path):
    """An IDE's stop button sends SIGINT to the lab's pid only: the script must get it too."""
    import os
    import signal

    journal = tmp_path / "lab.json"
    proc = subprocess.Popen([sys.executable, str(ROOT / "lab.py"), "--only", "checkpoint,retry", "--json",
                             str(journal)], env=clean_env(), cwd=str(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "Scenario 1 of " in line:
            break
    os.kill(proc.pid, signal.SIGINT)  # the lab's pid, not its process group
    out, err = proc.communicate(timeout=120)
    out = "".join(seen) + out
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    (script,) = json.loads(journal.read_text())["scripts"]
    assert script["exit_code"] == 130 and lab_schemas(embedded_params, script["run_id"]) == []
    assert "not run: fail_retry_exhaustion.py (interrupted)" in out and "Lab 2 of" not in out


def test_ctrl_c_at_a_lab_pause_counts_nothing_as_failed(embedded_params, tmp_path):
    """Ctrl-C at the first prompt: one scenario interrupted, three never started, no failure."""
    from test_workshop import drive_in_pty

    text, code, _ = drive_in_pty(["lab.py", "--only", "checkpoint", "--pause"], answer=False, group=True,
                                 cwd=str(tmp_path), limit=120)
    assert code == 130, text[-2000:]
    left = sum(script == "fail_checkpoint_corruption.py" for script, _ in lesson_scenarios()) - 1
    assert f"0 passed, 0 failed, 1 interrupted, {left} not run" in text, text[-2000:]


def test_every_fix_slot_of_every_lesson_gives_two_hints():
    """`--hint 1` nudges, `--hint 2` gives the idea: a slot without them prints nothing."""
    from common.lab import ORDER

    slots = [(script, f.scenario_id, f.slot, f.hints) for script in ORDER for f in declared_fixes(script)]
    assert len({(s, i) for s, i, _, _ in slots}) == SCENARIOS  # every scenario is an exercise
    for script, scenario_id, slot, hints in slots:
        assert len(hints) == 2 and all(len(h) > 20 for h in hints), (script, scenario_id, slot, hints)
