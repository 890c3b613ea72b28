"""Instructor features: --pause on a terminal (and never off one), --report as a Markdown handout."""
import os
import pty
import select
import signal
import subprocess
import sys
import time

from markdown_it import MarkdownIt

from conftest import ROOT, clean_env, run_script

QUICK = ["fail_checkpoint_corruption.py", "--only", "concurrent_access"]


def test_report_is_markdown_that_parses_into_headings_tables_and_code(embedded_params, tmp_path):
    handout = tmp_path / "handout.md"
    result = run_script(*QUICK, "--report", str(handout), tmp_path=tmp_path)
    assert result.returncode == 0
    tokens = MarkdownIt("commonmark").enable("table").parse(handout.read_text(encoding="utf-8"))
    headings = [(t.tag, tokens[i + 1].content) for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert headings[0] == ("h1", "fail_checkpoint_corruption.py")
    assert ("h2", "1. Concurrent checkpoint access (concurrent_access)") in [(t, c.replace("`", "")) for t, c in headings]
    assert [c for t, c in headings if t == "h3"] == ["📋 Description", "⚠️ Trigger", "❌ Error", "📚 Root cause",
                                                      "🔧 Recovery", "✅ Prevention"]
    assert sum(t.type == "table_open" for t in tokens) == 3  # summary, errors observed, measured
    fences = [t for t in tokens if t.type == "fence"]
    assert len(fences) == 6 and all(f.info == "text" for f in fences)
    assert "SerializationFailure" in next(f.content for f in fences if "40001" in f.content)


def drive_in_pty(args, answer: bool) -> tuple[str, int, float]:
    """Run on a pseudo-terminal (stdin and stdout); press Enter at each prompt if `answer`."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(ROOT / args[0]), *args[1:]], env=clean_env(NO_COLOR="1"),
                            stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    seen, started, deadline = b"", time.monotonic(), time.monotonic() + 60
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
            if answer and chunk.rstrip().endswith(b")"):
                os.write(leader, b"\n")
        elif proc.poll() is not None:
            break
        elif not answer and time.monotonic() - started > 8:
            break  # waiting for an Enter that will not come
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # Ctrl-C at the prompt: cleans up and exits 130
    proc.wait(15)
    os.close(leader)
    return seen.decode("utf-8", "replace"), proc.returncode, time.monotonic() - started


def test_pause_waits_for_enter_before_each_section_on_a_terminal(embedded_params):
    text, code, _ = drive_in_pty([*QUICK, "--pause"], answer=True)
    assert code == 0, text[-2000:]
    assert text.count("(Enter for") == 6
    waiting, code, _ = drive_in_pty([*QUICK, "--pause"], answer=False)
    assert code == 130 and waiting.count("(Enter for") == 1  # it really stops at the first prompt


def test_pause_is_ignored_without_a_terminal(embedded_params, tmp_path):
    result = run_script(*QUICK, "--pause", tmp_path=tmp_path)  # stdin is not a terminal
    assert result.returncode == 0 and "(Enter for" not in result.stdout
