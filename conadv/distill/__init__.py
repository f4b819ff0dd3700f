"""Ensemble knowledge distillation (MEAL V2, Shen & Savvides 2020, arXiv 2009.08453): frozen
teachers whose mean softmax is the student's target, a soft cross-entropy to it, and an
optional discriminator on the final outputs. The engine computes the teachers' outputs ahead,
on its side stream; the trainer adds the losses."""

from conadv.distill.discriminator import DiscriminatorTrainer, OutputDiscriminator
from conadv.distill.losses import DistillationLoss, soft_cross_entropy
from conadv.distill.teachers import TeacherEnsemble, build_teachers

__all__ = [
    "DiscriminatorTrainer",
    "DistillationLoss",
    "OutputDiscriminator",
    "TeacherEnsemble",
    "build_teachers",
    "soft_cross_entropy",
]
