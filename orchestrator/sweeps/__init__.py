"""Sweeps: ablations and searches as first-class objects."""
