//! W3C trace context across the outbox (`opentelemetry` feature): captured from the current
//! span when an event is built for enqueue, stored with it, sent as the broker headers
//! `traceparent` and `tracestate`, and restored as the parent of the spans that deliver, consume
//! and handle it. One trace runs from the request that wrote the event to the handler on the
//! other side, however long the event waited in between.
//!
//! It needs the application's `tracing` subscriber to carry a `tracing-opentelemetry` layer;
//! without one there is no OpenTelemetry context to capture and nothing is written. A
//! well-formed `traceparent` given explicitly
//! ([`EnqueueOptions::traceparent`](crate::EnqueueOptions::traceparent)) wins over the current
//! span; a malformed one is replaced by it.

#[cfg(feature = "opentelemetry")]
use crate::event::header;
use crate::event::Headers;

/// Writes the current span's trace context into `headers`, unless they carry a well-formed
/// one already (a malformed one is replaced, with its `tracestate`).
#[cfg(feature = "opentelemetry")]
pub(crate) fn capture(headers: &mut Headers) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    if headers.contains_key(header::TRACEPARENT) {
        if remote_context(headers).is_some() {
            return;
        }
        headers.remove(header::TRACEPARENT);
        headers.remove(header::TRACESTATE);
    }
    let context = tracing::Span::current().context();
    let span = context.span();
    let span_context = span.span_context();
    if !span_context.is_valid() {
        return;
    }
    headers.insert(
        header::TRACEPARENT.to_owned(),
        format!(
            "00-{}-{}-{:02x}",
            span_context.trace_id(),
            span_context.span_id(),
            span_context.trace_flags().to_u8()
        ),
    );
    let state = span_context.trace_state().header();
    if !state.is_empty() {
        headers.insert(header::TRACESTATE.to_owned(), state);
    }
}

#[cfg(not(feature = "opentelemetry"))]
pub(crate) fn capture(headers: &mut Headers) {
    let _ = headers;
}

/// Makes the trace context in `headers`, if any and well formed, the parent of `span`.
#[cfg(feature = "opentelemetry")]
pub(crate) fn restore(span: &tracing::Span, headers: &Headers) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    if let Some(parent) = remote_context(headers) {
        // Fails only when no OpenTelemetry layer records the span: nothing to restore then.
        let _ = span.set_parent(parent);
    }
}

#[cfg(not(feature = "opentelemetry"))]
pub(crate) fn restore(span: &tracing::Span, headers: &Headers) {
    let _ = (span, headers);
}

/// The remote context of a `traceparent` (version 00, or a later version read as 00, as the
/// W3C recommendation says) and its `tracestate`; `None` for anything malformed.
#[cfg(feature = "opentelemetry")]
fn remote_context(headers: &Headers) -> Option<opentelemetry::Context> {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use std::str::FromStr;

    let value = headers.get(header::TRACEPARENT)?.trim();
    let mut parts = value.split('-');
    let (version, trace_id, span_id, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    if !hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if !hex(trace_id, 32) || !hex(span_id, 16) || !hex(flags, 2) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()? & TraceFlags::SAMPLED.to_u8());
    let state = headers
        .get(header::TRACESTATE)
        .and_then(|s| TraceState::from_str(s).ok())
        .unwrap_or_default();
    let remote = SpanContext::new(trace_id, span_id, flags, true, state);
    Some(opentelemetry::Context::new().with_remote_span_context(remote))
}

#[cfg(all(test, feature = "opentelemetry"))]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceContextExt;

    fn headers(traceparent: &str) -> Headers {
        [(header::TRACEPARENT.to_owned(), traceparent.to_owned())].into()
    }

    #[test]
    fn reads_the_w3c_example() {
        let cx = remote_context(&headers(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ))
        .unwrap();
        let span = cx.span();
        let sc = span.span_context();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());
    }

    #[test]
    fn refuses_malformed_values() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00-é bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
        ] {
            assert!(remote_context(&headers(bad)).is_none(), "{bad:?} accepted");
        }
        // A later version may append fields.
        assert!(remote_context(&headers(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more"
        ))
        .is_some());
    }
}
