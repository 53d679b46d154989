"""Training progress: one updating line on a terminal, periodic lines otherwise."""

import sys
import time

_BAR_WIDTH = 20


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class ProgressBar:
    """Shows step, loss, learning rate, tokens/s and ETA.

    Speed and ETA count from the first step shown, so they leave out the
    start-up (loading, compiling the first step).
    """

    def __init__(self, total_steps: int, log_every: int, stream=None):
        self.total_steps, self.log_every = total_steps, log_every
        self.stream = stream or sys.stdout
        self.on_terminal = self.stream.isatty()
        self._started = None  # (time, step, tokens) at the first update
        self._line_open = False

    def update(self, step: int, loss: float, learning_rate: float, tokens: int) -> None:
        """After optimizer step `step` (1-based), having trained on `tokens` tokens in all."""
        now = time.perf_counter()
        if self._started is None:
            self._started = (now, step, tokens)
        if not self.on_terminal and step % self.log_every and step != self.total_steps:
            return
        start_time, start_step, start_tokens = self._started
        elapsed = now - start_time
        speed = (tokens - start_tokens) / elapsed if elapsed > 0 else 0.0
        eta = elapsed / (step - start_step) * (self.total_steps - step) if step > start_step else 0
        done = step / self.total_steps
        bar = "#" * round(done * _BAR_WIDTH)
        line = (
            f"step {step}/{self.total_steps} [{bar:-<{_BAR_WIDTH}}] {done:4.0%} | "
            f"loss {loss:.4f} | lr {learning_rate:.2e} | {speed:,.0f} tok/s | "
            f"ETA {format_duration(eta)}"
        )
        if self.on_terminal:
            self.stream.write("\r\033[K" + line)
            self._line_open = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own, below the bar."""
        if self._line_open:
            self.stream.write("\n")
            self._line_open = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._line_open:
            self.stream.write("\n")
            self._line_open = False
        self.stream.flush()
