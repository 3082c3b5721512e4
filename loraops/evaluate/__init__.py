"""Evaluation: validation losses, answer scores, forgetting, bootstrap intervals and the gate."""
