"""One-line errors for a value outside its allowed set (config fields, layer and router
settings), and for a Python file (a config or sweep file) that does not load."""
from __future__ import annotations

import importlib.util

__all__ = ["allowed", "call_in_file", "check_choice"]


def allowed(values) -> str:
  """'a', 'b', 'c': the allowed values as an error message lists them."""
  return ", ".join(map(repr, values))


def check_choice(owner: str, field: str, value, allowed_values) -> None:
  """Raises ValueError("{owner}.{field}={value!r} is unknown; allowed: ...") unless allowed."""
  if value not in allowed_values:
    raise ValueError(f"{owner}.{field}={value!r} is unknown; allowed: {allowed(allowed_values)}")


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
