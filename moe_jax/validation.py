"""One-line errors: for a value outside its allowed set (config fields, layer and router
settings), a config that cannot run (ConfigError), and the line that says why a run failed
(error_line). Low in the import graph: config, sweep, train, trace and upcycle all take from it."""
from __future__ import annotations

import re
import signal

__all__ = ["ConfigError", "allowed", "check_choice", "error_line"]


class ConfigError(ValueError):
  """A config (or its dataset) that cannot run; the message is one line naming the field."""


def allowed(values) -> str:
  """'a', 'b', 'c': the allowed values as an error message lists them."""
  return ", ".join(map(repr, values))


def check_choice(owner: str, field: str, value, allowed_values) -> None:
  """Raises ValueError("{owner}.{field}={value!r} is unknown; allowed: ...") unless allowed."""
  if value not in allowed_values:
    raise ValueError(f"{owner}.{field}={value!r} is unknown; allowed: {allowed(allowed_values)}")


def error_line(output: str, returncode: int) -> str:
  """The line that says why a run failed: its exception or config error, else its last line."""
  lines = [line.strip() for line in output.splitlines() if line.strip()]
  for line in reversed(lines):  # experiments.train's own lines ("Config error: ..."), exceptions
    if re.match(r"^([A-Z]\w* error|Diverged): |^[\w.]*(Error|Exception|Interrupt)\b", line):
      return line
  if returncode < 0:
    return f"killed by {signal.Signals(-returncode).name}"
  return lines[-1] if lines else f"exit code {returncode}"
