"""The Accord sidecar: messaging, retries and metrics for any workload."""

__version__ = "0.1.0"
