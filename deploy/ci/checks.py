"""The pass/fail tally shared by the deploy checks (policy_check.py, dashboard_check.py)."""

from __future__ import annotations

failures: list[str] = []
passes = 0


def check(cond: bool, what: str) -> None:
    """Records one check and prints its outcome."""
    global passes
    if cond:
        passes += 1
        print(f"  ok   {what}")
    else:
        failures.append(what)
        print(f"  FAIL {what}")


def summary(name: str) -> int:
    """Prints the tally; the exit status: 1 if any check failed."""
    if failures:
        print(f"{name}: {len(failures)} of {passes + len(failures)} checks FAILED")
    else:
        print(f"{name}: all {passes} checks ok")
    return 1 if failures else 0
