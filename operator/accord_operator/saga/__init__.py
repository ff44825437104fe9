"""SagaWorkflow: ordered steps with compensation (state machine + kopf shell)."""
