"""Sidecar injection: which pods get the Accord sidecar, and the JSON patch that adds it."""
