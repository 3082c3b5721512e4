"""Serving adapters over one base."""
