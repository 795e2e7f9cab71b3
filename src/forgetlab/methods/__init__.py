"""Continual-learning methods for the tasks after the first.

Each method is a small function applied around the one training loop (see ``train/trainer.py``):
``freeze`` changes which parameters train, ``replay`` changes the data, early stopping is a stop rule.
"""

from forgetlab.methods.config import METHODS, MethodConfig
from forgetlab.methods.freeze import freeze_parameters
from forgetlab.methods.replay import mix_replay

__all__ = ["METHODS", "MethodConfig", "freeze_parameters", "mix_replay"]
