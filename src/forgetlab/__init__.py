"""forgetlab: measure, explain and prevent forgetting in continual learning of language models."""

__version__ = "0.1.0"
