"""A stop on SIGTERM / SIGINT at a step boundary: clusters preempt jobs with SIGTERM (torchrun forwards it to its
workers), and the run should end with a checkpoint instead of losing every step since the last one."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

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

    def __init__(self, par: Parallel, device: torch.device) -> None:
        self.par, self.device = par, device
        self.received = 0  # the signal this process got
        self.agreed = 0  # the signal every rank acts on
        self._pending: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
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

    def poll(self) -> bool:
        """Whether to stop now, before the next step.

        Alone: whether a signal came. Under torchrun every rank sends its flag in a one-element all-reduce (MAX) on
        the training device, the device the process group serves, and acts on the result of the previous poll,
        copied to the host asynchronously: it costs no host synchronisation, and every rank stops after the same
        step, one step after the first rank got the signal.
        """
        if not self.par.active:
            self.agreed = self.received
            return bool(self.agreed)
        if self._pending is not None:
            flag, copied = self._pending
            if copied is not None:
                copied.synchronize()
            self.agreed = int(flag.item())
        sent = torch.tensor([float(self.received)], device=self.device)
        dist.all_reduce(sent, op=dist.ReduceOp.MAX, group=self.par.group)
        host = sent.to("cpu", non_blocking=True)  # into pinned memory: the copy runs behind the step's kernels
        copied = torch.cuda.Event() if self.device.type == "cuda" else None
        if copied is not None:
            copied.record()
        self._pending = (host, copied)
        return bool(self.agreed)
