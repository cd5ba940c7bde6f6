"""Errors that are the user's to fix, as opposed to bugs.

`experiments.main` prints a `ConfigError` as one message and exits with status 2, without a
traceback; anything else is a bug and keeps its traceback.
"""


class ConfigError(ValueError):
  """A config value that cannot work. `field` is the dotted config path, e.g. 'model.num_heads'.

  `fix`, where the message advises a concrete change, is that change as config overrides
  ({'model.attention': 'gqa'}): applying it must give a config that passes the same check
  (tests apply every fix and validate again).
  """

  def __init__(self, field: str, message: str, fix: dict | None = None):
    self.field = field
    self.message = message
    self.fix = fix
    super().__init__(f"{field}: {message}")
