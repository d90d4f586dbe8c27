"""Checkpoints: save, verify (the manifest of sizes and SHA-256), resume and retention."""
