"""Scores from a classifier's logits: an Inception-Score-style score and agreement with requested labels."""

from __future__ import annotations

import math

import torch

from ..errors import UserError


def _check_logits(logits: torch.Tensor) -> None:
    if logits.ndim != 2 or len(logits) == 0:
        raise UserError(f"logits must be (N, classes) with N >= 1, got shape {tuple(logits.shape)}")


def inception_score(logits: torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))) over logits (N, C), p(y) the mean prediction: 1 when every sample gets
    the same prediction, C when each is classified with certainty and the classes are used equally."""
    _check_logits(logits)
    log_p_yx = logits.double().log_softmax(dim=1)  # (N, C)
    log_p_y = log_p_yx.logsumexp(dim=0) - math.log(len(logits))  # (C,) log of the mean prediction
    kl = (log_p_yx.exp() * (log_p_yx - log_p_y)).sum(dim=1)  # (N,)
    return math.exp(kl.mean().item())


def class_agreement(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples whose most likely class (logits (N, C)) is the requested label (N,)."""
    _check_logits(logits)
    if labels.shape != (len(logits),):
        raise UserError(f"{len(logits)} samples but labels of shape {tuple(labels.shape)}")
    return (logits.argmax(dim=1) == labels.to(logits.device)).double().mean().item()
