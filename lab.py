"""The whole failure lab in one command: the four fail_*.py scripts in order, then one summary of
all their scenarios, one exit status, and optionally one journal (--json) and one handout (--report).

    .venv/bin/python lab.py                      # the whole lab
    .venv/bin/python lab.py --brief --pause      # presenting it, one section at a time
    .venv/bin/python lab.py --json lab.json --report lab.md
    .venv/bin/python lab.py --progress           # every exercise: its state, and the next command
"""
from common.lab import main

if __name__ == "__main__":
    main()
