"""How the fleet tells a hung or broken instance from a busy one.

A ready instance's `/ping` is polled every second. An instance that stops answering (a process stopped or stuck
with its event loop blocked) or answers 503 (its engine thread died) would otherwise stay in the fleet forever:
after `failures` misses in a row, each no 200 within `timeout` seconds, it is stopped and replaced.
"""

from __future__ import annotations

from dataclasses import dataclass

TIMEOUT_SETTING = "SERVELET_HEALTH_CHECK_TIMEOUT"
FAILURES_SETTING = "SERVELET_HEALTH_CHECK_FAILURES"


@dataclass(frozen=True)
class HealthCheck:
    timeout: float = 5.0  # seconds one /ping may take
    failures: int = 3  # misses in a row that take an instance out of service

    def given_up(self, misses: int) -> bool:
        return misses >= self.failures

    def reason(self, name: str, problem: str) -> str:
        """Why the instance was stopped, for the log, its failure and its endpoint's FailureReason."""
        return (
            f"instance {name} failed its health check {self.failures} times in a row (last: {problem}; "
            f"{TIMEOUT_SETTING}={self.timeout:g}, {FAILURES_SETTING}={self.failures}): it was stopped and the endpoint "
            "starts a new instance"
        )
