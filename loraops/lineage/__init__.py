"""Lineage: git and DVC (committing outputs, experiments)."""
