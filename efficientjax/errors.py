"""Errors that are the user's to fix, as opposed to bugs.

`experiments.main` prints a `ConfigError` as one message and exits with status 2, without a
traceback; anything else is a bug and keeps its traceback.
"""


class ConfigError(ValueError):
  """A config value that cannot work. `field` is the dotted config path, e.g. 'model.num_heads'."""

  def __init__(self, field: str, message: str):
    self.field = field
    self.message = message
    super().__init__(f"{field}: {message}")
