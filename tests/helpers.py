"""Small configs and models shared by the tests."""

from typing import Any

from configs import quickstart


def smoke_config(**overrides: Any) -> dict[str, Any]:
  """The quickstart's smoke preset as a plain dict, with dotted overrides ('train.steps': 4)."""
  c = quickstart.get_config('smoke').to_dict()
  for path, value in overrides.items():
    *parents, key = path.split('.')
    node = c
    for p in parents:
      node = node[p]
    if key not in node:
      raise KeyError(path)
    node[key] = value
  return c
