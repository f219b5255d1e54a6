"""Shared pieces of `configs/*.py`: argument parsing and the model variants.

`parse_arg("variant=tiny,ratio=0.3", variant="demo", ratio=0.5)` returns a ConfigDict with typed
values; unknown keys are errors (as big_vision's `parse_arg`).
"""

import ml_collections


def parse_arg(arg, **defaults):
  """Parses 'k=v,k2=v2' (or a bare variant name) against typed defaults."""
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in str(arg).split(","):
    item = item.strip()
    if not item:
      continue
    if "=" not in item:
      if "variant" not in defaults:
        raise ValueError(f"config arg {item!r} has no '=' and this config has no 'variant'")
      key, value = "variant", item
    else:
      key, value = item.split("=", 1)
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r}; allowed: {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config arg {key}={value!r}: expected a boolean")
      out[key] = value.lower() in ("true", "1")
    elif default is None:
      out[key] = value
    else:
      out[key] = type(default)(value)
  return out
