//! RabbitMQ transport for the outbox framework (lapin). Not implemented yet.
