"""Rebuilding a registered version from its commit and comparing it with what the registry holds."""
