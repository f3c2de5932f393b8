"""Save, stop and requeue on the signal a scheduler sends before it stops a job.

Both stacks install their own handler for `checkpoint.exit_signal` (exit_signal_handler): on the signal they finish
the iteration, save a checkpoint and leave the loop (SystemExit 0). That handler replaces whatever was there,
submitit's requeue handler included, and MLM never puts the old one back. So `ExitSignal` remembers the handler
from before the job, puts a recorder in front of the stack's once training has started, and after the stack has
stopped hands the signal to the old handler: inside a submitit job (hydra/launcher=slurm) that is submitit's, which
requeues the job; the requeued job continues from the checkpoint (checkpoint.resume=if_available).
tests/test_preemption.py holds this on a real local Slurm cluster.
"""

from __future__ import annotations

import signal


class ExitSignal:
    def __init__(self, name: str | None):
        self.signum = signal.Signals[name] if name else None
        self.before = signal.getsignal(self.signum) if self.signum else None
        self.received = False

    def watch(self) -> None:
        """Once the stack has installed its handler (training started): note the signal, then let the stack act."""
        if self.signum is None:
            return
        stack = signal.getsignal(self.signum)

        def note_then_stack(signum, frame):
            self.received = True
            if callable(stack):
                stack(signum, frame)

        signal.signal(self.signum, note_then_stack)

    def hand_over(self) -> None:
        """After the stack stopped: the handler from before the job is back, and gets the signal if it came."""
        if self.signum is None:
            return
        signal.signal(self.signum, self.before)
        if self.received and callable(self.before):
            print(f"unified_train: {self.signum.name} received: checkpoint saved; handing over", flush=True)
            self.before(self.signum, None)
