"""A registry per study axis: the config string names an entry, one file provides it."""

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from efficientjax.errors import ConfigError

T = TypeVar('T')


class Registry(Generic[T]):
  """Maps config strings to implementations; unknown names fail with the valid ones listed."""

  def __init__(self, field: str):
    self.field = field  # the config field that names an entry, for error messages
    self._entries: dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    def add(entry: T) -> T:
      if name in self._entries:
        raise ValueError(f'{self.field}: {name!r} is registered twice')
      self._entries[name] = entry
      return entry
    return add

  def get(self, name: str) -> T:
    if name not in self._entries:
      raise ConfigError(
          self.field, f'unknown value {name!r}; valid values: {", ".join(sorted(self._entries))}')
    return self._entries[name]

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(sorted(self._entries))
