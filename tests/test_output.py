"""The console fits a room's terminal: reflowed prose, tables that wrap by column, rules as wide as
their titles, over-wide code wrapped with a visible marker, frames named by package."""
import io
import sys

import pytest

from conftest import ROOT  # noqa: F401  (puts the project on sys.path)
from common import output
from common.output import CONTINUED, Console, frame_path, paragraphs, table_lines, terminal_width, wrap_code


class Utf8(io.StringIO):
    encoding = "utf-8"


def console(width=80, **kw) -> tuple[Console, io.StringIO]:
    stream = Utf8()
    return Console(stream, **{"ascii_only": False, "colour": False, "width": width, **kw}), stream


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_width_is_80_off_a_terminal_and_between_80_and_100_on_one(monkeypatch):
    assert terminal_width(io.StringIO()) == 80

    class Tty(io.StringIO):
        def isatty(self):
            return True

    for columns, expected in ((60, 80), (92, 92), (180, 100)):
        monkeypatch.setenv("COLUMNS", str(columns))
        assert terminal_width(Tty()) == expected


def test_hand_wrapped_prose_reflows_and_list_items_keep_their_hanging_indent():
    c, out = console(60)
    c.prose("""
        A first sentence that the author wrapped
        early. And a second one.
        (a) An item whose text runs on long enough to need a second line at sixty columns wide.
            its continuation, hand-indented under the item
        (b) Another item.

        A second paragraph.""")
    got = lines(out)
    assert got[0] == "   A first sentence that the author wrapped early. And a"
    assert got[1] == "   second one."
    assert got[2].startswith("   (a) An item") and got[3].startswith("       ") and "hand-indented" in " ".join(got[2:5])
    assert "   (b) Another item." in got and got[-2:] == ["", "   A second paragraph."]
    assert max(map(len, got)) <= 60


def test_paragraphs_keep_a_deeper_indented_line_as_its_own_item():
    (para,) = paragraphs("Intro:\n    SELECT 1\nafter")
    assert [body for _, _, body in para] == ["Intro:", "SELECT 1", "after"]


def test_the_first_paragraph_only_for_the_presenter():
    c, out = console()
    c.prose("One.\nStill one.\n\nTwo.", first_only=True)
    assert lines(out) == ["   One. Still one."]


def test_a_table_that_fits_is_left_alone_and_a_wide_one_wraps_inside_its_cells():
    assert table_lines(["a", "b"], [["1", "2"]], 80) == ["   a  b", "   -  -", "   1  2"]
    long = "a long explanation of the figure " * 3
    got = table_lines(["cause", "table", "keys twice"], [[long.strip(), "orders_v1", "2000"]], 60)
    assert max(map(len, got)) <= 60 and len(got) > 3
    assert " ".join(ln[3:40] for ln in got).count("explanation") == 3  # nothing lost: it wrapped


def test_a_table_with_too_many_columns_is_cut_into_tables_that_repeat_the_first_column():
    headers = ["policy"] + [f"figure number {i}" for i in range(8)]
    got = table_lines(headers, [["no jitter"] + [str(10 ** 9 + i) for i in range(8)]], 80)
    assert max(map(len, got)) <= 80
    assert sum(ln.startswith("   policy") for ln in got) >= 2 and "" in got


def test_rules_are_as_wide_as_their_titles_and_long_titles_wrap():
    c, out = console()
    c.header("Summary")
    assert lines(out)[1:] == ["=" * 20, "  Summary", "=" * 20]
    c, out = console()
    c.header("Scenario 2 of 4: " + "a very long title " * 6)
    got = lines(out)
    assert max(map(len, got)) <= 80 and len(got) > 4 and got[1] == got[-1]


def test_over_wide_code_wraps_with_a_visible_marker_and_code_that_fits_is_untouched():
    assert wrap_code("      x = 1", 80) == ["      x = 1"]
    got = wrap_code("      retrying = Retrying(retry=retry_if_exception_type(psycopg2.OperationalError), x=1", 60)
    assert len(got) == 2 and got[1].lstrip().startswith(CONTINUED) and max(map(len, got)) <= 60
    assert "".join(ln.replace(f"  {CONTINUED} ", "").strip() for ln in got).replace(" ", "") == \
        "retrying=Retrying(retry=retry_if_exception_type(psycopg2.OperationalError),x=1"
    c, out = console(60, ascii_only=True)
    c.code("y = " + "z" * 80)
    assert ">>" in out.getvalue() and max(map(len, lines(out))) <= 60


def test_bars_shrink_to_the_width():
    c, out = console(60)
    c.bars([("naive: one insert per record", 979.5), ("fixed", 24.2)], unit=" ms")
    got = lines(out)
    assert max(map(len, got)) <= 60 and got[0].endswith("979.5 ms") and "█" in got[0]


def test_exception_messages_wrap_and_the_presenter_sees_the_first_line_only():
    try:
        raise ValueError("first line " + "word " * 30 + "\n\tsecond line")
    except ValueError as exc:
        err = exc
    c, out = console()
    c.exception(err)
    got = lines(out)
    assert max(map(len, got)) <= 80 and got[0] == "   ValueError" and got[1].startswith("   | first line")
    assert any("second line" in ln for ln in got) and any("Traceback" in ln for ln in got)
    c, out = console(brief=True)
    c.exception(err, brief=True)
    assert not any("second line" in ln or "Traceback" in ln for ln in lines(out))


def test_frames_are_named_by_their_package():
    import json.decoder

    import tenacity

    assert frame_path(tenacity.__file__) == "tenacity/__init__.py"
    assert frame_path(json.decoder.__file__) == "json/decoder.py"
    assert frame_path(output.__file__) == "common/output.py"
    assert frame_path(str(ROOT / "fail_retry_exhaustion.py")) in ("fail_retry_exhaustion.py",)
    assert frame_path("/nowhere/pkg/mod.py") == "pkg/mod.py"


def test_trimmed_traceback_names_packages_not_bare_init_files():
    from tenacity import Retrying, stop_after_attempt

    def fails():
        raise OSError("disk full")

    with pytest.raises(OSError) as caught:
        Retrying(stop=stop_after_attempt(1), reraise=True)(fails)
    text = "\n".join(output.trimmed_traceback(caught.value, verbose=True))
    assert 'File "tenacity/__init__.py"' in text and 'File "__init__.py"' not in text


@pytest.mark.parametrize("value, expected", [(None, "NULL"), (True, "yes"), ({"a": 1, "b": None}, "a 1, b NULL"),
                                             ((32, 32), "32, 32"), ([], "none"), (0.5, "0.5"),
                                             (250499123.45, "250499123.45"), (2.5e8, "250000000")])
def test_words_never_print_a_repr(value, expected):
    assert output.words(value) == expected


def test_table_cells_are_words():
    c, out = console()
    c.table(["x", "y", "z", "w"], [[None, True, ["currency"], 1234567.89]])
    assert lines(out)[-1].split() == ["NULL", "yes", "currency", "1234567.89"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_a_long_path_breaks_after_a_slash_never_inside_a_name():
    """The banner's target at 80 columns: the embedded server's socket folder is one long word."""
    from common.output import wrap

    url = "postgresql://postgres@/postgres?host=/home/someone/.local/share/pipeline-failure-lab/pg18"
    got = wrap(f"target: {url}  [embedded\u00a0default\u00a0server]", 80, "", "        ")
    assert max(map(len, got)) <= 80 and len(got) > 1
    assert got[0].endswith("/") and "".join(ln.strip() for ln in got).startswith(f"target: {url}")
    assert all(not ln.rstrip().endswith(("pipeline-failure", "pipeline-")) for ln in got)
