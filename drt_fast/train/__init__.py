"""Training: Gaussian augmentation, SmoothAdv, DRT (GD and CM regularizers), diagnostics."""
from .diagnose import Diagnosis, diagnose
from .losses import drt_terms, drt_terms_from_logits, gaussian_loss, margins, member_forward
from .smoothadv import pgd_smoothed
from .trainer import TRAINERS, TrainConfig, train

__all__ = ["drt_terms", "drt_terms_from_logits", "gaussian_loss", "margins", "member_forward",
           "pgd_smoothed", "TRAINERS", "TrainConfig", "train", "Diagnosis", "diagnose"]
