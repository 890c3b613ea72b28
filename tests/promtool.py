"""promtool, Prometheus's rule checker, from Debian's `prometheus` package.

Only the promtool binary is taken: the package is downloaded with `apt-get download` and
unpacked into the cache (~/.cache/faillab/promtool, FAILLAB_CACHE moves it), so nothing is
installed system-wide and no Prometheus server is started. A machine without apt, or where the
package cannot be had, skips the tests that need it, with the reason.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("FAILLAB_CACHE") or Path.home() / ".cache" / "faillab")


class Unavailable(Exception):
    pass


def promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    cached = CACHE / "promtool" / "promtool"
    if cached.exists():
        return str(cached)
    if not shutil.which("apt-get"):
        raise Unavailable("promtool is not installed and this machine has no apt-get to fetch Debian's prometheus")
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="faillab-promtool-", dir=cached.parent) as folder:
        def apt(*args):
            return subprocess.run(args, cwd=folder, capture_output=True, text=True, timeout=600)
        got = apt("apt-get", "download", "prometheus")
        if got.returncode != 0:  # a fresh machine's package lists may be empty
            apt("apt-get", "update")
            got = apt("apt-get", "download", "prometheus")
        debs = list(Path(folder).glob("prometheus_*.deb"))
        if got.returncode != 0 or not debs:
            raise Unavailable(f"Debian's prometheus package could not be downloaded: {got.stderr.strip()[-300:]}")
        unpacked = Path(folder) / "x"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True, timeout=300)
        binary = unpacked / "usr" / "bin" / "promtool"
        if not binary.exists():
            raise Unavailable("Debian's prometheus package holds no usr/bin/promtool")
        tmp = cached.with_suffix(".part")
        shutil.copy2(binary, tmp)
        os.replace(tmp, cached)  # another worker may be doing the same: the last complete copy wins
    return str(cached)
