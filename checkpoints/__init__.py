"""Checkpoints: save, resume and retention (checkpointing.py); verified once: manifest, parse checks, model fit
(verify.py)."""
