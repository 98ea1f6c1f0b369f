"""A one-line progress report on stderr: files done, rate, ETA, failures.

On a terminal the line is redrawn in place (at most 10 times a second);
otherwise (a log file, CI) a line is printed every `log_every` seconds, so logs
stay readable. The ETA is based on bytes: files are embedded shortest first,
so a rate in files/s would promise too early an end. `keras.utils.Progbar`
is not used: it writes to stdout, with ANSI colours, and redraws in place
whenever the process runs on a POSIX system, terminal or not.
"""

import sys
import time


def _clock(seconds):
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Reports `done / total` files.

    Args:
        total: files to process.
        total_bytes: their size in bytes (for the ETA).
        stream: where to write (stderr).
        enabled: False for no output at all.
        log_every: seconds between lines when `stream` is not a terminal.
    """

    def __init__(self, total, total_bytes, stream=None, enabled=True, log_every=30.0):
        self.total = int(total)
        self.total_bytes = max(int(total_bytes), 1)
        self.stream = sys.stderr if stream is None else stream
        self.enabled = bool(enabled) and self.total > 0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.1 if self.tty else float(log_every)
        self.done = self.failed = self.bytes = 0
        self.start = time.perf_counter()
        self._last = self.start if not self.tty else 0.0
        self._width = 0

    def line(self):
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        fraction = self.done / self.total if self.total else 1.0
        filled = int(20 * fraction)
        text = (
            f"embed [{'#' * filled}{'.' * (20 - filled)}] {self.done:,}/{self.total:,} files "
            f"{self.done / elapsed:.1f} files/s"
        )
        if self.done < self.total:
            if self.bytes:
                text += f", ETA {_clock(elapsed * (self.total_bytes - self.bytes) / self.bytes)}"
        else:
            text += f", {_clock(elapsed)}"
        if self.failed:
            text += f", {self.failed:,} failed"
        return text

    def advance(self, files=1, nbytes=0, failed=0):
        self.done += int(files)
        self.bytes += int(nbytes)
        self.failed += int(failed)
        now = time.perf_counter()
        if self.enabled and now - self._last >= self.interval and self.done < self.total:
            self._last = now
            self._show()

    def _show(self, end=""):
        text = self.line()
        if self.tty:
            pad = " " * max(0, self._width - len(text))
            self.stream.write("\r" + text + pad + end)
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self):
        if self.enabled:
            self._show(end="\n" if self.tty else "")
            self.enabled = False
