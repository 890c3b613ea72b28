"""Plumbing shared by the fail_*.py scripts: configuration, the embedded server, the private
schema, output, the scenario runner and fault injection. No module here knows any scenario."""
from common.runner import Scenario, main, scenario

__all__ = ["Scenario", "main", "scenario"]
