"""Progress of a long step: a bar on a terminal, a line every ``interval_s`` seconds in a log file.

    with Progress("warm-up tiny-s", total=1400) as progress:
        for step in range(1400):
            ...
            progress.update(tokens=n_tokens, loss=loss)

In a Snakemake job log (stderr is not a terminal) a background thread writes the current state at a fixed
interval, whether or not the loop moved, so a slow job and a hung one look different::

    [warm-up tiny-s] step 120/1400 (9%) | loss 0.8123 | 8,512 tok/s | 1.92 step/s | 1:02 elapsed | ETA 11:06

plus one line when the step starts and one when it ends. On a terminal it is a tqdm bar with the same
numbers. The interval is ``$CTPO_PROGRESS_INTERVAL`` seconds (default 30).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, TextIO

INTERVAL_ENV = "CTPO_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0


def interval_from_env() -> float:
    """Seconds between progress lines: ``$CTPO_PROGRESS_INTERVAL`` (a positive number), else 30."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(
            f"{INTERVAL_ENV}={raw!r} is not a number of seconds; unset it or give e.g. 30"
        ) from None
    if value <= 0:
        raise ValueError(f"{INTERVAL_ENV}={raw!r} must be > 0 seconds")
    return value


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Progress:
    """Where a loop is (``unit`` count / ``total``), its latest metrics, throughput and ETA.

    ``mode``: ``"bar"`` on a terminal, ``"lines"`` otherwise, ``"off"`` when not ``enabled``. ``initial``
    counts units done before this process (a resumed run): the rate and the ETA use only the new ones.
    """

    def __init__(
        self,
        name: str,
        total: int,
        unit: str = "step",
        *,
        initial: int = 0,
        enabled: bool = True,
        interval_s: float | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.name, self.total, self.unit = name, int(total), unit
        self.done = self.initial = int(initial)
        self.tokens = 0
        self.metrics: dict[str, Any] = {}
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_from_env() if interval_s is None else float(interval_s)
        isatty = getattr(self.stream, "isatty", lambda: False)()
        self.mode = "off" if not enabled else "bar" if isatty else "lines"
        self.start = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.initial, desc=name, unit=unit, file=self.stream)
        elif self.mode == "lines":
            self._write(self.line())
            self._thread = threading.Thread(target=self._heartbeat, name=f"progress:{name}", daemon=True)
            self._thread.start()

    # -- the loop's side ------------------------------------------------------------------------------
    def update(self, n: int = 1, tokens: int = 0, **metrics: Any) -> None:
        """``n`` more units done (``tokens`` more, for tokens/s); ``metrics`` replace the shown ones."""
        with self._lock:
            self.done += n
            self.tokens += tokens
            self.metrics.update(metrics)
        if self._bar is not None:
            self._bar.update(n)
            self._bar.set_postfix({k: _number(v) for k, v in self.metrics.items()}, refresh=False)

    def set(self, **metrics: Any) -> None:
        """Replace shown metrics without counting a unit."""
        self.update(0, **metrics)

    def close(self) -> None:
        """Stop the heartbeat and write the final line."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._write(self.line(final=True))
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.mode = "off"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- what is written ------------------------------------------------------------------------------
    def line(self, final: bool = False) -> str:
        """The status line: ``[name] unit done/total (pct) | metrics | rates | elapsed | ETA``."""
        with self._lock:
            done, tokens, metrics = self.done, self.tokens, dict(self.metrics)
        elapsed = time.monotonic() - self.start
        pct = f" ({100 * done / self.total:.0f}%)" if self.total else ""
        parts = [f"[{self.name}] {self.unit} {done}/{self.total}{pct}"]
        parts += [f"{k} {_number(v)}" for k, v in metrics.items()]
        new = done - self.initial
        if tokens and elapsed > 0:
            parts.append(f"{tokens / elapsed:,.0f} tok/s")
        if new and elapsed > 0:
            parts.append(f"{new / elapsed:.3g} {self.unit}/s")
        parts.append(f"{_clock(elapsed)} elapsed")
        if final:
            parts.append("done" if done >= self.total else "stopped")
        elif new > 0:
            parts.append(f"ETA {_clock((self.total - done) * elapsed / new)}")
        else:
            parts.append("ETA ?")
        return " | ".join(parts)

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._write(self.line())
