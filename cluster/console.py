"""A quiet terminal for long driver runs (``genloop demo``): what the user came for on the terminal, the rest of
Ray's and vLLM's chatter in a log file.

On the terminal: the driver's own ``print()`` output (main thread) and progress bars (tqdm lines, the driver's and
the ones Ray streams from its workers). In the log file: everything, including Python logging of every library,
Ray's worker/raylet output streamed to the driver, and C-level writes to fds 1 and 2 (redirected to the file).
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import threading
from pathlib import Path
from typing import TextIO

# a tqdm bar: "  45%|████▌     | 405/900 [01:10<01:26, 5.72it/s, loss=3.2]" (also Ray Data's "Running: ... 3/10")
BAR = re.compile(r"\d+%\|.*\|\s*\d+/\d+|\d+/\d+ \[\d+:\d+(?:<|\])")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
WORKER_PREFIX = re.compile(r"^\s*\([^()]*pid=\d+[^()]*\)\s*")  # "(RayTrainWorker pid=123, ip=...) "


class Console:
    """Route the process's output: ``say`` and main-thread prints -> terminal + log; bars -> terminal; the rest -> log.

    Use as a context manager; on exit the original streams and file descriptors are restored."""

    def __init__(self, log_path: str | Path, verbose: bool = False) -> None:
        self.log_path = Path(log_path)
        self.verbose = verbose  # everything to the terminal as well (no filtering)
        self._lock = threading.Lock()
        self._bar_open = False
        self.closed = False

    # ---- setup / teardown
    def __enter__(self) -> "Console":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self.log = open(self.log_path, "a", buffering=1, encoding="utf-8", errors="replace")
        self._saved_fds = (os.dup(1), os.dup(2))
        self.term: TextIO = os.fdopen(os.dup(self._saved_fds[0]), "w", buffering=1, encoding="utf-8", errors="replace")
        self._saved_streams = (sys.stdout, sys.stderr)
        # C-level writes (Ray's core worker, vLLM's native code) land in the log file
        os.dup2(self.log.fileno(), 1)
        os.dup2(self.log.fileno(), 2)
        sys.stdout = _Router(self, err=False)
        sys.stderr = _Router(self, err=True)
        self.quiet_loggers()
        return self

    def __exit__(self, *exc: object) -> None:
        self.end_bar()
        sys.stdout, sys.stderr = self._saved_streams
        os.dup2(self._saved_fds[0], 1)
        os.dup2(self._saved_fds[1], 2)
        for fd in self._saved_fds:
            os.close(fd)
        for h in _stream_handlers():
            if h.stream in (self.log, self.term) or isinstance(h.stream, _Router):
                try:
                    h.setStream(sys.stderr)
                except AttributeError:
                    pass
        self.closed = True
        self.term.close()
        self.log.close()

    def quiet_loggers(self) -> None:
        """Point every logging handler that writes to a terminal stream at the log file (call again after a library
        adds handlers, e.g. between steps)."""
        if self.verbose:
            return
        for h in _stream_handlers():
            s = h.stream
            if isinstance(s, _Router) or s in self._saved_streams or s in (sys.__stdout__, sys.__stderr__):
                try:
                    h.setStream(self.log)
                except AttributeError:  # a handler whose stream is a read-only property (follows sys.stderr)
                    pass

    # ---- output
    def say(self, text: str = "") -> None:
        """A line for the user: terminal and log."""
        with self._lock:
            self._end_bar_locked()
            self.term.write(text + "\n")
            self.log.write(text + "\n")

    def bar(self, line: str) -> None:
        """A progress bar update: overwrite the terminal's current line."""
        line = WORKER_PREFIX.sub("", ANSI.sub("", line).rstrip("\r\n").split("\r")[-1]).rstrip()
        if not line:
            return
        with self._lock:
            width = _columns(self._saved_fds[0])
            self.term.write("\r" + line[: width - 1].ljust(min(width - 1, len(line) + 8)))
            self.term.flush()
            self._bar_open = True

    def end_bar(self) -> None:
        with self._lock:
            self._end_bar_locked()

    def _end_bar_locked(self) -> None:
        if self._bar_open:
            self.term.write("\n")
            self._bar_open = False

    def tail(self, n: int = 40) -> str:
        """The last ``n`` lines of the log file."""
        self.log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])


class _Router(io.TextIOBase):
    """``sys.stdout`` / ``sys.stderr`` stand-in: sorts each write between the terminal and the log."""

    def __init__(self, console: Console, err: bool) -> None:
        self.console = console
        self.err = err
        self._main = threading.main_thread()
        self._line = ""  # the terminal's unfinished line (print() writes its pieces separately)

    def writable(self) -> bool:
        return True

    def _after(self) -> TextIO | None:
        """After the console closed (atexit hooks of Ray / colorama still hold this stream): the real stream."""
        return (sys.__stderr__ if self.err else sys.__stdout__) if self.console.closed else None

    def isatty(self) -> bool:  # tqdm draws bars with \r only on a tty-like stream
        real = self._after()
        return real.isatty() if real else self.console.term.isatty()

    def fileno(self) -> int:
        real = self._after()
        return real.fileno() if real else self.console.log.fileno()

    def write(self, s: str) -> int:
        real = self._after()
        if real:
            return real.write(s)
        c = self.console
        bar = BAR.search(s)
        if not bar:  # bar redraws stay out of the log (hundreds per run)
            c.log.write(s)
        if c.verbose:
            c.term.write(s)
        elif bar:
            for piece in s.replace("\r", "\n").splitlines():
                if BAR.search(piece):
                    c.bar(piece)
        elif (
            not self.err
            and threading.current_thread() is self._main
            and sys._getframe(1).f_code.co_filename != logging.__file__
        ):  # print(), not a logging handler
            self._line += s
            while "\n" in self._line:
                line, self._line = self._line.split("\n", 1)
                with c._lock:
                    c._end_bar_locked()
                    c.term.write(line + "\n")
        return len(s)

    def flush(self) -> None:
        real = self._after()
        if real:
            real.flush()
            return
        self.console.log.flush()
        self.console.term.flush()


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    return [
        h
        for lg in loggers
        for h in lg.handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]


def _columns(fd: int) -> int:
    try:
        return os.get_terminal_size(fd).columns
    except (OSError, ValueError):
        return 120
