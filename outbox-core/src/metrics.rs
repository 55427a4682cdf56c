//! Metrics through the [`metrics`](https://docs.rs/metrics) facade: the relay and the consumer
//! record them, an exporter of your choice (Prometheus, OpenTelemetry, StatsD) publishes them.
//! Without an installed recorder every call is a no-op.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `outbox_events_delivered_total` | counter | `table`, `event_type`, `destination` | deliveries the destination confirmed, counted when the relay settles them: an event sent twice (a lease that ran out, a crash) counts twice |
//! | `outbox_events_failed_total` | counter | `table`, `event_type`, `destination` | failed attempts that will be retried (a delivery that timed out, its outcome unknown, is not counted) |
//! | `outbox_events_dead_total` | counter | `table`, `event_type`, `destination` | events given up (dead) |
//! | `outbox_delivery_latency_seconds` | histogram | `table`, `destination` | from the event's commit (`created_at`, or its `enqueue_at` time, or its requeue or republish) to its delivery being recorded |
//! | `messaging_client_operation_duration_seconds` | histogram | `table`, `messaging_operation_name` = `publish` | one call to the destination with a batch (OpenTelemetry `messaging.client.operation.duration`) |
//! | `outbox_events` | gauge | `table`, `status` | rows by status (`pending`, `delivered`, `dead`), see [`Outbox::record_gauges`](crate::Outbox::record_gauges) |
//! | `outbox_oldest_pending_age_seconds` | gauge | `table` | how long the oldest due event has waited: **the lag to alert on** |
//! | `outbox_aggregates_parked` | gauge | `table` | aggregates parked at a dead event |
//! | `outbox_wal_retained_bytes` | gauge | `slot` | WAL the log-tailing relay's replication slot keeps (`wal` feature), read at each heartbeat |
//! | `outbox_consumer_handled_total` | counter | `source`, `event_type` | messages handled and acknowledged |
//! | `outbox_consumer_retried_total` | counter | `source`, `event_type` | handler failures that will be retried |
//! | `outbox_consumer_dead_total` | counter | `source`, `event_type` | messages dead-lettered |
//! | `messaging_process_duration_seconds` | histogram | `source`, `event_type` | handler time (OpenTelemetry `messaging.process.duration`) |
//!
//! Labels are bounded: table names, event types, destination and source names come from your
//! code, never aggregate or event ids. Names follow OpenTelemetry's messaging semantic
//! conventions where they define one, written the way Prometheus exporters write them (dots as
//! underscores, units and `_total` as suffixes).

use std::time::Duration;

/// `outbox_events_delivered_total`.
pub const DELIVERED: &str = "outbox_events_delivered_total";
/// `outbox_events_failed_total`.
pub const FAILED: &str = "outbox_events_failed_total";
/// `outbox_events_dead_total`.
pub const DEAD: &str = "outbox_events_dead_total";
/// `outbox_delivery_latency_seconds`.
pub const DELIVERY_LATENCY: &str = "outbox_delivery_latency_seconds";
/// `messaging_client_operation_duration_seconds`.
pub const PUBLISH_DURATION: &str = "messaging_client_operation_duration_seconds";
/// `outbox_events`.
pub const EVENTS: &str = "outbox_events";
/// `outbox_oldest_pending_age_seconds`.
pub const OLDEST_PENDING_AGE: &str = "outbox_oldest_pending_age_seconds";
/// `outbox_aggregates_parked`.
pub const PARKED: &str = "outbox_aggregates_parked";
/// `outbox_wal_retained_bytes`.
pub const WAL_RETAINED: &str = "outbox_wal_retained_bytes";
/// `outbox_consumer_handled_total`.
pub const CONSUMER_HANDLED: &str = "outbox_consumer_handled_total";
/// `outbox_consumer_retried_total`.
pub const CONSUMER_RETRIED: &str = "outbox_consumer_retried_total";
/// `outbox_consumer_dead_total`.
pub const CONSUMER_DEAD: &str = "outbox_consumer_dead_total";
/// `messaging_process_duration_seconds`.
pub const PROCESS_DURATION: &str = "messaging_process_duration_seconds";

/// What happened to one event, as the relay recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    Delivered,
    Failed,
    Dead,
}

pub(crate) fn settled(
    table: &str,
    event_type: &str,
    destination: &str,
    outcome: Settled,
    waited: Option<Duration>,
) {
    let name = match outcome {
        Settled::Delivered => DELIVERED,
        Settled::Failed => FAILED,
        Settled::Dead => DEAD,
    };
    let labels = [
        ("table", table.to_owned()),
        ("event_type", event_type.to_owned()),
        ("destination", destination.to_owned()),
    ];
    ::metrics::counter!(name, &labels).increment(1);
    if let (Settled::Delivered, Some(waited)) = (outcome, waited) {
        let labels = [
            ("table", table.to_owned()),
            ("destination", destination.to_owned()),
        ];
        ::metrics::histogram!(DELIVERY_LATENCY, &labels).record(waited.as_secs_f64());
    }
}

pub(crate) fn published(table: &str, took: Duration) {
    let labels = [
        ("table", table.to_owned()),
        ("messaging_operation_name", "publish".to_owned()),
    ];
    ::metrics::histogram!(PUBLISH_DURATION, &labels).record(took.as_secs_f64());
}

pub(crate) fn gauges(table: &str, status: &crate::OutboxStatus) {
    for (name, value) in [
        ("pending", status.pending),
        ("delivered", status.delivered),
        ("dead", status.dead),
    ] {
        let labels = [("table", table.to_owned()), ("status", name.to_owned())];
        ::metrics::gauge!(EVENTS, &labels).set(value as f64);
    }
    let labels = [("table", table.to_owned())];
    let age = status.oldest_pending_age_ms.unwrap_or(0) as f64 / 1000.0;
    ::metrics::gauge!(OLDEST_PENDING_AGE, &labels).set(age);
    ::metrics::gauge!(PARKED, &labels).set(status.aggregates_parked as f64);
}

/// What the consumer did with one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handled {
    Acked,
    Retried,
    Dead,
}

pub(crate) fn handled(source: &str, event_type: &str, outcome: Handled) {
    let labels = [
        ("source", source.to_owned()),
        ("event_type", event_type.to_owned()),
    ];
    let name = match outcome {
        Handled::Acked => CONSUMER_HANDLED,
        Handled::Retried => CONSUMER_RETRIED,
        Handled::Dead => CONSUMER_DEAD,
    };
    ::metrics::counter!(name, &labels).increment(1);
}

/// One handler run, whatever its outcome.
pub(crate) fn handler_time(source: &str, event_type: &str, took: Duration) {
    let labels = [
        ("source", source.to_owned()),
        ("event_type", event_type.to_owned()),
    ];
    ::metrics::histogram!(PROCESS_DURATION, &labels).record(took.as_secs_f64());
}

#[cfg(feature = "wal")]
pub(crate) fn wal_retained(slot: &str, bytes: u64) {
    ::metrics::gauge!(WAL_RETAINED, "slot" => slot.to_owned()).set(bytes as f64);
}
