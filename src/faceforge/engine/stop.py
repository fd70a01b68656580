"""A stop on SIGTERM / SIGINT at a step boundary: clusters preempt jobs with SIGTERM (torchrun forwards it to its
workers), and the run should end with a checkpoint instead of losing every step since the last one."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch.distributed as dist

from faceforge.distributed import all_reduce_scalars
from faceforge.engine.parallel import Parallel
from faceforge.errors import FaceforgeError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(FaceforgeError):
    """Training stopped on a signal after writing a checkpoint; the message names the step and how to resume."""

    def __init__(self, signum: int, step: int, run_dir: Path) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}, checkpoint written; "
                         f"resume with: faceforge train --resume {run_dir}")


class StopOnSignal:
    """Within `with`, SIGTERM and SIGINT only ask the loop to stop (a second SIGINT stops at once).

    DataLoader workers forked inside the block inherit the handlers, so a signal sent to the whole process group
    does not kill them under the loop either.
    """

    def __init__(self, par: Parallel, every: int = 1) -> None:
        self.par, self.every = par, max(int(every), 1)
        self.received = 0  # the signal this process got
        self.agreed = 0  # the signal every rank acts on
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or signum

    def poll(self, step: int) -> bool:
        """Whether to stop now, before the next step.

        Alone: whether a signal came. Under torchrun the ranks agree on steps that are multiples of `every` (the
        steps whose loss is read anyway): each sends its flag in one MAX all-reduce on the process group's device,
        so every rank stops after the same step, at most `every` steps after the first rank got the signal.
        """
        if not self.par.active:
            self.agreed = self.received
        elif step % self.every == 0:
            flags = all_reduce_scalars([self.received], dist.ReduceOp.MAX, self.par.group, self.par.device)
            self.agreed = int(flags[0])
        return bool(self.agreed)
