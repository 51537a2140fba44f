"""One-line errors for a value outside its allowed set (config fields, layer and router
settings)."""
from __future__ import annotations

__all__ = ["allowed", "check_choice"]


def allowed(values) -> str:
  """'a', 'b', 'c': the allowed values as an error message lists them."""
  return ", ".join(map(repr, values))


def check_choice(owner: str, field: str, value, allowed_values) -> None:
  """Raises ValueError("{owner}.{field}={value!r} is unknown; allowed: ...") unless allowed."""
  if value not in allowed_values:
    raise ValueError(f"{owner}.{field}={value!r} is unknown; allowed: {allowed(allowed_values)}")
