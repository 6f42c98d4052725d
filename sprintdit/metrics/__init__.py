"""Sample-quality metrics: Frechet distance of feature statistics, precision/recall/density/coverage,
logit scores, and a small Fashion-MNIST classifier that provides the features and logits."""
from .fmnist_classifier import FMNISTClassifier, classify, load_classifier
from .frechet import feature_stats, frechet_distance
from .prdc import PRDC, prdc
from .scores import class_agreement, inception_score

__all__ = [
    "FMNISTClassifier",
    "PRDC",
    "class_agreement",
    "classify",
    "feature_stats",
    "frechet_distance",
    "inception_score",
    "load_classifier",
    "prdc",
]
