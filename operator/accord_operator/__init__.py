"""Accord: Saga, Two-Phase Commit, CQRS and Sidecar patterns as Kubernetes resources."""

__version__ = "0.1.0"
