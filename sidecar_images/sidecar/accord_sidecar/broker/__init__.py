"""The message broker behind publish/subscribe (NATS JetStream)."""
