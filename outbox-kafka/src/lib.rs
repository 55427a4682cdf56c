//! Kafka transport for the outbox framework (rdkafka). Not implemented yet.
