"""The one small runtime every service shares: Kafka clients, the consume -> transform -> produce
loop with at-least-once delivery, dead letters, metrics/health endpoint, configuration and the
embedded broker."""
