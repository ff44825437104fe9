"""TwoPhaseTransaction: two-phase commit coordinated through .status."""
