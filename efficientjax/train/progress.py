"""A one-line progress display: step, loss, tokens/s and time left."""

import sys
import time


class Progress:
  """Redraws one line on a terminal; prints a line every `every` steps elsewhere (logs, CI)."""

  def __init__(self, total_steps: int, every: int, stream=None):
    self.total = total_steps
    self.every = max(1, every)
    self.stream = stream or sys.stderr
    self.tty = self.stream.isatty()
    self._start = time.perf_counter()
    self._start_step: int | None = None

  def update(self, step: int, loss: float, tokens_per_s: float, extra: str = '') -> None:
    if self._start_step is None:
      self._start_step = step - 1
      self._start = time.perf_counter()
    if not self.tty and step % self.every and step != self.total:
      return
    done = step - self._start_step
    elapsed = time.perf_counter() - self._start
    eta = elapsed / max(done, 1) * (self.total - step)
    width = len(str(self.total))
    line = (f'step {step:>{width}}/{self.total} | loss {loss:.4f} | {tokens_per_s:,.0f} tok/s'
            f' | eta {int(eta) // 60}:{int(eta) % 60:02d}{extra}')
    if self.tty:
      self.stream.write('\r' + line.ljust(100) + ('\n' if step == self.total else ''))
    else:
      self.stream.write(line + '\n')
    self.stream.flush()

  def message(self, text: str) -> None:
    """A line that must not be overwritten by the next redraw."""
    self.stream.write(('\n' if self.tty else '') + text + '\n')
    self.stream.flush()
