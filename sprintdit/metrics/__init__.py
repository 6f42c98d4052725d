"""Sample-quality metrics: Frechet distance of feature statistics, precision/recall/density/coverage,
logit scores, a small Fashion-MNIST classifier that provides the features and logits, and the FID
InceptionV3 and DINOv2 feature networks (weights from local files)."""

from .dinov2 import DINOv2ViT, dinov2_features, load_dinov2
from .fmnist_classifier import FMNISTClassifier, classify, load_classifier
from .frechet import feature_stats, frechet_distance
from .inception import InceptionV3FID, inception_features, load_inception
from .prdc import PRDC, prdc
from .scores import class_agreement, inception_score

__all__ = [
    "DINOv2ViT",
    "FMNISTClassifier",
    "InceptionV3FID",
    "PRDC",
    "class_agreement",
    "classify",
    "dinov2_features",
    "feature_stats",
    "frechet_distance",
    "inception_features",
    "inception_score",
    "load_classifier",
    "load_dinov2",
    "load_inception",
    "prdc",
]
