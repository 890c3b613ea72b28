"""Imported by the fork server of Scenario.spawn_many() as it starts: it loads the lesson's main
script once, the way each spawned worker would load it (as __mp_main__), so every worker forked
from the server finds the lesson already loaded. (multiprocessing's own preload of "__main__"
is never given the script's path, so each worker would load the script again.)"""
import json
import os
from multiprocessing import spawn

MAIN_VARIABLE = "FAILLAB_FORK_SERVER_MAIN"

_main = os.environ.pop(MAIN_VARIABLE, None)
if _main:
    spawn.prepare(json.loads(_main))
