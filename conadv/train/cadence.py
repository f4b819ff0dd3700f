"""When things happen between optimizer steps: log, check finiteness, evaluate, checkpoint,
stop. Decided here from the config (and the ranks' agreed stop request), so the training loop
reads as a list of delegations (after torchtitan's trainer) and every rank decides the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from conadv.config import RunConfig
from conadv.train.preemption import REASONS, TERMINATED, StopRequest


@dataclass(frozen=True)
class AfterStep:
    """What to do after optimizer step `step` (1-based count of steps taken)."""

    step: int
    done: bool  # the last step of the run
    log: bool
    check_finite: bool  # poll the non-finite guard (a collective, at logging and checkpoints)
    evaluate: bool
    checkpoint: bool
    stop_reason: str | None  # stop after this step (with a checkpoint)
    terminated: bool  # the stop is a termination signal: exit 75
    planned: bool  # the stop is train.stop_at_step: a scheduler must not run the job again


class Cadence:
    def __init__(self, cfg: RunConfig, steps_per_epoch: int, total_steps: int,
                 start_step: int, stop_request: StopRequest) -> None:
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = total_steps
        self.log_every = cfg.log.every_steps
        self.eval_every = round(cfg.train.eval_every_epochs * steps_per_epoch)
        self.checkpoint_every = cfg.checkpoint.every_steps
        self.stop_at = cfg.train.stop_at_step
        self.stop_request = stop_request
        self._saved_epoch = start_step // steps_per_epoch

    def after(self, step: int) -> AfterStep:
        """Call on every rank after every optimizer step (it polls the stop request, which
        agrees over ranks without a host synchronisation)."""
        done = step == self.total_steps
        level = 0 if done else self.stop_request.poll()
        stop_reason = REASONS.get(level)
        planned = step == self.stop_at and not done
        if planned:
            stop_reason = "train.stop_at_step reached"
        epoch_done = step // self.steps_per_epoch > self._saved_epoch
        every = self.checkpoint_every
        checkpoint = bool(done or stop_reason or (every and step % every == 0)
                          or (not every and epoch_done))
        log = step % self.log_every == 0 or done
        evaluate = not stop_reason and bool(
            done or (self.eval_every and step % self.eval_every == 0))
        return AfterStep(step, done, log, log or checkpoint, evaluate, checkpoint, stop_reason,
                         level == TERMINATED, planned)

    def checkpointed(self, step: int) -> None:
        self._saved_epoch = step // self.steps_per_epoch
