"""Diagnostics of forgetting for any sequence of HF checkpoints: update angles, landscapes, features, recovery."""
