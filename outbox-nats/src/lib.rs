//! NATS JetStream transport for the outbox framework (async-nats). Not implemented yet.
