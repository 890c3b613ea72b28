"""Plumbing shared by the fail_*.py scripts: configuration, the embedded server, the private
schema, output, the scenario API, cleanup, the runner and fault injection. No module here knows
any scenario."""
from common.runner import main
from common.scenario import Scenario, scenario

__all__ = ["Scenario", "main", "scenario"]
