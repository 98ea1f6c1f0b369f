"""Stopping a pretraining run on a signal without losing anything.

What preemptible machines, SLURM time limits and Kubernetes evictions send is a
signal, some time before the kill: SIGTERM (Kubernetes, SLURM, `docker stop`),
SIGUSR1 (what `sbatch --signal=USR1@120` is often set to) or SIGINT (Ctrl-C).
`StopSignals` turns each into a request: the run finishes the step in flight,
every process of a multi-process job agrees on that step (`StopAtStep`: a
collective of the stop flags after every step), process 0 writes a checkpoint
there, and the run ends with `EXIT_CODE` (75, EX_TEMPFAIL: "run again to
resume"), which a scheduler can requeue on. A request that comes before
training (while decoding the cache, computing statistics or compiling) ends
the run just as cleanly: the clips decoded so far are kept and the last
checkpoint stays. A second SIGINT stops at once (KeyboardInterrupt).

Test hook: `BYOLA_TEST_SIGNAL_AT=KIND:N:SIG` makes the process send itself SIG
(TERM, INT or USR1) at a deterministic point: `step:N` after global step N,
`begin:N` when step N begins (the signal arrives during the step), `decode:N`
after the N-th decoded file of the cache build.
"""

import os
import signal
import sys
import threading

EXIT_CODE = 75
SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
TEST_ENV = "BYOLA_TEST_SIGNAL_AT"


class Stopped(Exception):
    """The run stopped on a signal; what it did is kept (checkpoint, cache)."""

    def __init__(self, signal_name, checkpoint=None, where=None, written=True):
        self.signal_name = signal_name
        self.checkpoint = checkpoint
        by = f"by {signal_name}" if signal_name else "(another process of the job received a signal)"
        where = f" {where}" if where else ""
        if checkpoint is None:
            kept = "no checkpoint yet"
        else:
            kept = f"checkpoint {checkpoint} {'written' if written else 'kept'}"
        super().__init__(
            f"Stopped {by}{where}: {kept}; run the same command again to resume (exit code {EXIT_CODE})."
        )


class StopSignals:
    """While active, SIGTERM, SIGINT and SIGUSR1 set `.received` (the first
    signal's name) instead of ending the process; a second SIGINT raises
    KeyboardInterrupt. Handlers are installed only in the main thread (the only
    one Python delivers signals to) and restored on exit."""

    def __init__(self):
        self.received = None
        self._previous = {}
        self._decoded = 0

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for name in SIGNALS:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number, frame):
        name = signal.Signals(number).name
        if self.received is None:
            self.received = name
            again = "; Ctrl-C again stops at once" if number == signal.SIGINT else ""
            # os.write, not print: the handler may interrupt a print to the same stream.
            os.write(
                sys.stderr.fileno(),
                f"{name} received: stopping after the step in flight, with a checkpoint{again}.\n".encode(),
            )
        elif number == signal.SIGINT:
            raise KeyboardInterrupt

    @property
    def requested(self):
        return self.received is not None

    def test_point(self, kind, count):
        """Sends the signal the test hook names for this point, if any."""
        spec = os.environ.get(TEST_ENV, "").split(":")
        if len(spec) == 3 and spec[0] == kind and spec[1] == str(count):
            # raise_signal: delivered to this thread and handled before it returns.
            signal.raise_signal(getattr(signal, "SIG" + spec[2]))

    def should_stop_decoding(self):
        """For `LogMelCache.build(should_stop=...)`: asked after every file."""
        self._decoded += 1
        self.test_point("decode", self._decoded)
        return self.requested


class StopAtStep:
    """After every training step: does any process of the job stop here?

    `agree(flag)` returns True if any process's flag is set (a collective in a
    multi-process job, every process calling it after the same step). Used by
    `pretrain.TrainingCheckpoint`, which writes the checkpoint at that step.
    """

    def __init__(self, signals, agree=bool):
        self.signals = signals
        self.agree = agree

    def before_step(self, global_step):
        self.signals.test_point("begin", global_step)

    def after_step(self, global_step):
        self.signals.test_point("step", global_step)
        return bool(self.agree(self.signals.requested))


__all__ = ["EXIT_CODE", "StopAtStep", "StopSignals", "Stopped"]
