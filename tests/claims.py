"""The claims each scenario makes on a passing run, by shape (figures and run ids taken out).

A scenario that makes fewer claims than it always does has skipped a demonstration or a proof
(a branch inverted, a step never run), even when every claim it did make held: the journal's
verdicts cannot see that, this comparison does. tests/claims.json holds the shapes; write it
again from a passing run of the whole lab after a lesson's claims change on purpose:

    .venv/bin/python lab.py --json /tmp/lab.json && .venv/bin/python tests/claims.py /tmp/lab.json
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

GOLDEN = Path(__file__).with_name("claims.json")
_RUN_ID = re.compile(r"\b(?=[0-9a-f]*\d)[0-9a-f]{8}\b")  # a run's id, in a schema or a role name
_FIGURE = re.compile(r"[-+]?\d[\d,._:]*(?:e[-+]?\d+)?")


def shape(claim: str) -> str:
    """The claim with its figures and run ids replaced by N: what stays the same run to run."""
    return _FIGURE.sub("N", _RUN_ID.sub("RUN", claim))


def shapes(journal: dict) -> dict[str, list[str]]:
    """{scenario id: sorted claim shapes} of every passed scenario of a script's or the lab's journal."""
    records = [r for j in journal.get("scripts", [journal]) for r in j["scenarios"]]
    return {r["id"]: sorted({shape(c["claim"]) for c in r["checks"]}) for r in records if r["status"] == "passed"}


def missing(journal: dict, golden: dict | None = None) -> dict[str, list[str]]:
    """The claims each passed scenario of `journal` did not make, of those it always makes."""
    golden = golden if golden is not None else json.loads(GOLDEN.read_text(encoding="utf-8"))
    made = shapes(journal)
    return {sid: gone for sid, got in made.items()
            if (gone := sorted(set(golden.get(sid, [])) - set(got)))}


if __name__ == "__main__":
    runs = [shapes(json.loads(Path(p).read_text(encoding="utf-8"))) for p in sys.argv[1:]]
    if not runs:
        sys.exit(__doc__)
    # Several runs (the embedded default, a configured server): keep what every one of them made.
    ids = dict.fromkeys(sid for r in runs for sid in r)
    golden = {sid: sorted(set.intersection(*(set(r[sid]) for r in runs if sid in r))) for sid in ids}
    GOLDEN.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN.name}: {sum(map(len, golden.values()))} claims of {len(golden)} scenarios")
