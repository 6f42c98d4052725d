"""Scores from a classifier's logits: the Inception Score over splits and agreement with requested labels.

The Inception Score follows the ADM evaluator (guided-diffusion `evaluator.py`, after improved-gan): the samples are
cut, in their order, into consecutive splits of `split_size` (5,000; the last split keeps the remainder), the score
exp(E_x KL(p(y|x) || p(y))) is taken within each split, p(y) being that split's mean prediction, and the splits'
scores are averaged. At 50,000 samples this is torch-fidelity's convention too (10 splits, its `isc_splits`; it
shuffles the samples first unless told not to). The score depends on the split size (about 4% higher with one split
of 10,000 than with two of 5,000 on the same logits), so compare scores made with the same one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..config import IS_SPLIT_SIZE  # samples per split, the ADM evaluator's; 0 stands for one split over all samples
from ..errors import UserError


@dataclass(frozen=True)
class InceptionScore:
    mean: float  # the splits' mean score, the number papers report
    std: float  # their population standard deviation (torch-fidelity's inception_score_std)
    splits: int


def _check_logits(logits: torch.Tensor) -> None:
    if logits.ndim != 2 or len(logits) == 0:
        raise UserError(f"logits must be (N, classes) with N >= 1, got shape {tuple(logits.shape)}")


def split_score(logits: torch.Tensor) -> float:
    """exp(E_x KL(p(y|x) || p(y))) over logits (N, C), p(y) the mean prediction: 1 when every sample gets the same
    prediction, C when each is classified with certainty and the classes are used equally."""
    log_p_yx = logits.double().log_softmax(dim=1)  # (N, C)
    log_p_y = log_p_yx.logsumexp(dim=0) - math.log(len(logits))  # (C,) log of the mean prediction
    kl = (log_p_yx.exp() * (log_p_yx - log_p_y)).sum(dim=1)  # (N,)
    return math.exp(kl.mean().item())


def inception_score(logits: torch.Tensor, split_size: int = IS_SPLIT_SIZE) -> InceptionScore:
    """The Inception Score of logits (N, C) over consecutive splits of `split_size` samples (0: one split)."""
    _check_logits(logits)
    if split_size < 0:
        raise UserError(f"the Inception Score's split size must be >= 0 (0: one split), got {split_size}")
    scores = [split_score(part) for part in logits.split(split_size or len(logits))]
    return InceptionScore(mean=float(np.mean(scores)), std=float(np.std(scores)), splits=len(scores))


def class_agreement(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples whose most likely class (logits (N, C)) is the requested label (N,)."""
    _check_logits(logits)
    if labels.shape != (len(logits),):
        raise UserError(f"{len(logits)} samples but labels of shape {tuple(labels.shape)}")
    return (logits.argmax(dim=1) == labels.to(logits.device)).double().mean().item()
