"""The checkout: params.yaml read and written in place, the run lock, server checks, the run config."""
