"""Look at a handout as a reader does: Markdown -> HTML (markdown-it-py, code highlighted by
Pygments when it is there) -> a screenshot in a real browser (Debian's chromium, headless).

    .venv/bin/python tests/browser.py handout.md handout.png     # writes handout.html too

chromium is installed with apt-get when it is missing and the user may (root, or apt-get works);
`chromium()` returns None with the reason otherwise, and the tests skip with it.
"""
from __future__ import annotations

import html
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from markdown_it import MarkdownIt

CSS = """
body { font-family: sans-serif; max-width: 60em; margin: 2em auto; line-height: 1.45; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; } th, td { border: 1px solid #bbb; padding: 0.2em 0.6em; }
th { background: #eee; } pre { background: #f6f8fa; padding: 0.7em; overflow-x: auto; border-radius: 4px; }
blockquote { border-left: 4px solid #3a7; margin-left: 0; padding-left: 1em; background: #f3fbf6; }
code { font-family: monospace; }
"""


def _highlight(code: str, lang: str, _attrs) -> str:
    try:
        from pygments import highlight
        from pygments.formatters import HtmlFormatter
        from pygments.lexers import get_lexer_by_name
    except ImportError:
        return ""
    try:
        lexer = get_lexer_by_name(lang)
    except Exception:
        return ""
    return highlight(code, lexer, HtmlFormatter(nowrap=True))


def to_html(markdown: str, title: str = "handout") -> str:
    md = MarkdownIt("commonmark", {"html": True, "highlight": _highlight}).enable("table")
    style = CSS
    try:
        from pygments.formatters import HtmlFormatter
        style += HtmlFormatter().get_style_defs("pre code")
    except ImportError:
        pass
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{md.render(markdown)}</body></html>")


def chromium() -> tuple[str | None, str]:
    """(path of chromium, '') or (None, why not)."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found, ""
    if not shutil.which("apt-get"):
        return None, "no chromium and no apt-get to install it"
    if os.geteuid() != 0:
        return None, "no chromium, and installing it needs root (apt-get install chromium)"
    install = subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True, text=True,
                             timeout=900, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    found = shutil.which("chromium")
    return (found, "") if found else (None, f"apt-get install chromium failed: {install.stderr.strip()[-300:]}")


def screenshot(html_path: Path, png_path: Path, width: int = 1100, height: int = 2400) -> None:
    """A real browser's rendering of html_path, as a PNG."""
    browser, why = chromium()
    if browser is None:
        raise RuntimeError(why)
    with tempfile.TemporaryDirectory(prefix="faillab-chromium-") as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--screenshot={png_path}", html_path.resolve().as_uri()],
                       capture_output=True, timeout=120, check=False)
    if not png_path.exists():
        raise RuntimeError(f"chromium wrote no screenshot to {png_path}")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write(__doc__)
        return 2
    md, png = Path(argv[0]), Path(argv[1])
    page = png.with_suffix(".html")
    page.write_text(to_html(md.read_text(encoding="utf-8"), md.stem), encoding="utf-8")
    screenshot(page, png)
    print(f"{page}\n{png}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
