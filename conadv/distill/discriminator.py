"""MEAL V2's discriminator on the final outputs, trained with its own optimizer in the same
step as the student.

The discriminator D reads a probability vector and says "teacher" (logit > 0) or "student".
Each micro-step D learns from the teachers' probabilities (label 1) and the student's, detached
(label 0); the student minimises the non-saturating adversarial loss -log D(student), with D's
weights held constant, so each side's gradient reaches only its own parameters. (The released
MEAL V2 code instead adds D's loss to the student's and steps both with one SGD optimizer.) D is
small: C -> C/8 -> C/64 -> 1 units (at least 16 and 8 hidden), as the released code's 1x1
convolutions with K = 8. Its gradients are averaged over ranks before its step, so D is the
same on every rank, like the student.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from conadv.distributed import all_reduce_sum, world_size


class OutputDiscriminator(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        first = max(num_classes // 8, 16)
        second = max(first // 8, 8)
        self.net = nn.Sequential(nn.Linear(num_classes, first), nn.ReLU(),
                                 nn.Linear(first, second), nn.ReLU(), nn.Linear(second, 1))

    def forward(self, probs: Tensor) -> Tensor:
        """The logit of "these are a teacher's probabilities", one per row."""
        return self.net(probs).squeeze(1)


class DiscriminatorTrainer:
    def __init__(self, num_classes: int, lr: float, temperature: float, device: torch.device,
                 seed: int) -> None:
        with torch.random.fork_rng(devices=[]):  # the same D on every rank and every restart
            torch.manual_seed(seed)
            self.model = OutputDiscriminator(num_classes).to(device)
        # GAN practice (Radford et al. 2016): Adam with beta1 = 0.5
        # capturable on CUDA: its step count stays on the device (no host sync; the
        # non-finite guard can undo a step on the device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr, betas=(0.5, 0.999),
                                          capturable=device.type == "cuda")
        self.temperature = temperature

    def _probs(self, logits: Tensor) -> Tensor:
        return F.softmax(logits.float() / self.temperature, dim=1)

    def fooling_loss(self, student_logits: Tensor) -> Tensor:
        """The student's adversarial loss: D should take its outputs for a teacher's. D's
        weights enter as constants (no .grad for D from the student's loss)."""
        frozen = {name: p.detach() for name, p in self.model.named_parameters()}
        verdict = functional_call(self.model, frozen, (self._probs(student_logits),))
        return F.binary_cross_entropy_with_logits(verdict, torch.ones_like(verdict))

    def learn(self, student_logits: Tensor, teacher_probs: Tensor,
              accumulation: int) -> dict[str, Tensor]:
        """One micro-step of D: accumulate its gradient; its loss and accuracy (detached)."""
        student = self._probs(student_logits.detach())
        verdict = self.model(torch.cat([teacher_probs, student]))
        truth = torch.cat([torch.ones(len(teacher_probs), device=verdict.device),
                           torch.zeros(len(student), device=verdict.device)])
        loss = F.binary_cross_entropy_with_logits(verdict, truth)
        (loss / accumulation).backward()
        accuracy = ((verdict > 0).float() == truth).float().mean()
        return {"disc_loss": loss.detach(), "disc_accuracy": accuracy}

    def step(self) -> None:
        """After the student's optimizer step: average D's gradients over ranks, step, clear."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        ranks = world_size()
        if ranks > 1 and grads:
            flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads])) / ranks
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
