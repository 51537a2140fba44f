"""One-line errors: for a value outside its allowed set (config fields, layer and router
settings), a config that cannot run (ConfigError), a Python file (a config or sweep file) that
does not load (call_in_file), and the line that says why a run failed (error_line). Low in the
import graph: config, sweep, train, trace and upcycle all take from it."""
from __future__ import annotations

import importlib.util
import re
import signal

__all__ = ["ConfigError", "allowed", "call_in_file", "check_choice", "error_line"]


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


def call_in_file(path: str, function: str, args=(), fmt: str = "", module: str = "") -> object:
  """Executes the Python file `path` (as `module`) and returns `function(*args)` of it;
  ValueError with one line naming the file otherwise: its syntax error and line, "defines no
  {function}()" (then `fmt`, where the format is described), or what loading or the call raised
  (a ValueError's own message alone: the files' own one-line errors, "router='swich' has no
  ...")."""
  spec = importlib.util.spec_from_file_location(module or f"{function}_file", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    if not callable(getattr(module, function, None)):
      raise ValueError(f"{path}: defines no {function}(); {fmt}".rstrip("; "))
    return getattr(module, function)(*args)
  except SyntaxError as error:  # in the file, or in a module it imports
    raise ValueError(f"{error.filename}, line {error.lineno}: {error.msg}") from error
  except ValueError:
    raise
  except Exception as error:  # the file raised while loading or in the call: its own line
    raise ValueError(f"{path}: {type(error).__name__}: {' '.join(str(error).split())}") from error
