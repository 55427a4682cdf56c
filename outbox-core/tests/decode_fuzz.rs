//! Property tests (fuzzing) of what a consumer decodes from a broker: arbitrary headers and
//! payloads never panic; they give a clear error, and well-formed messages round-trip.

use outbox_core::{wire, Dispatcher, Envelope, HandlerContext, Headers, Registry, Retry};
use proptest::prelude::*;
use uuid::Uuid;

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Shipped {
    order: String,
    items: Vec<u32>,
}

impl outbox_core::OutboxEvent for Shipped {
    const EVENT_TYPE: &'static str = "order.shipped";
    const AGGREGATE_TYPE: &'static str = "order";
    const SCHEMA_VERSION: u32 = 1;
    const TOPIC: &'static str = "orders";
    fn aggregate_id(&self) -> String {
        self.order.clone()
    }
}

/// Header names: the outbox's own, near misses, and anything.
fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(wire::ID.to_owned()),
        Just(wire::EVENT_TYPE.to_owned()),
        Just(wire::AGGREGATE_TYPE.to_owned()),
        Just(wire::AGGREGATE_ID.to_owned()),
        Just(wire::SEQUENCE.to_owned()),
        Just(wire::SCHEMA_VERSION.to_owned()),
        Just(wire::CORRELATION_ID.to_owned()),
        Just("correlation_id".to_owned()),
        Just("OUTBOX-ID".to_owned()),
        ".{0,24}",
    ]
}

/// Header values: well-formed ones, numbers out of range, and anything (NUL, line breaks).
fn header_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(Uuid::now_v7().to_string()),
        Just("18446744073709551616".to_owned()),
        Just("-1".to_owned()),
        Just("4294967296".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        ".{0,40}",
        "[\\x00-\\x1f]{0,4}",
    ]
}

fn dispatcher() -> Dispatcher {
    let registry = Registry::builder()
        .handler::<Shipped, _, _>("ship", |_: Shipped, _: HandlerContext| async { Ok(()) })
        .unwrap()
        .build();
    Dispatcher::new(registry)
}

fn envelope(event_type: String, payload: String, schema_version: u32) -> Envelope {
    Envelope {
        id: Uuid::now_v7(),
        created_at: chrono::Utc::now(),
        event_type,
        aggregate_type: "order".into(),
        aggregate_id: "o-1".into(),
        sequence: 1,
        schema_version,
        topic: "orders".into(),
        payload,
        headers: Headers::new(),
        attempt: 1,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_headers_never_panic(
        headers in proptest::collection::vec((header_name(), header_value()), 0..12),
        payload in ".{0,64}",
        attempt in any::<u32>(),
    ) {
        let pairs = headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        match Envelope::from_wire(pairs, payload, attempt) {
            Ok(envelope) => prop_assert_eq!(envelope.attempt, attempt),
            Err(reason) => prop_assert!(!reason.is_empty()),
        }
    }

    #[test]
    fn well_formed_messages_round_trip(
        event_type in "[a-z.]{1,20}",
        aggregate_id in "\\PC{1,30}",
        sequence in 1..i64::MAX,
        schema_version in 1..u32::MAX,
        extra in proptest::collection::btree_map("x-[a-z]{1,8}", "[ -~]{0,20}", 0..4),
        payload in ".{0,64}",
    ) {
        let mut sent = envelope(event_type, payload.clone(), schema_version);
        sent.aggregate_id = aggregate_id;
        sent.sequence = sequence;
        for (k, v) in &extra {
            sent.headers.insert(k.clone(), v.clone());
        }
        let wire = sent.wire_headers();
        let got = Envelope::from_wire(wire.iter().map(|(k, v)| (k.as_str(), v.as_str())), payload, 1)
            .expect("a message the outbox wrote decodes");
        prop_assert_eq!(got.id, sent.id);
        prop_assert_eq!(&got.event_type, &sent.event_type);
        prop_assert_eq!(&got.aggregate_id, &sent.aggregate_id);
        prop_assert_eq!(got.sequence, sent.sequence);
        prop_assert_eq!(got.schema_version, sent.schema_version);
        prop_assert_eq!(&got.headers, &sent.headers);
    }

    #[test]
    fn arbitrary_payloads_are_dead_with_a_reason_never_a_panic(
        payload in prop_oneof![
            ".{0,80}",
            Just("{\"order\": \"o\", \"items\": [-1]}".to_owned()),
            Just("{\"order\": \"o\", \"items\": [4294967296]}".to_owned()),
            Just("{\"order\": \"o\"}".to_owned()),
            Just("[".repeat(10_000)),
            Just("{\"order\": \"\\u0000\", \"items\": []}".to_owned()),
        ],
        event_type in prop_oneof![Just("order.shipped".to_owned()), "[a-z.]{1,12}"],
        version in prop_oneof![Just(1u32), any::<u32>()],
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let known = event_type == "order.shipped" && version == 1;
        let decodes = serde_json::from_str::<Shipped>(&payload).is_ok();
        let result = runtime.block_on(dispatcher().dispatch(&envelope(event_type, payload, version)));
        match result {
            Ok(()) => prop_assert!(known && decodes),
            Err(e) => {
                prop_assert!(!e.reason.is_empty());
                if known {
                    // An undecodable payload can never succeed: dead at once.
                    prop_assert_eq!(e.retry, Retry::Never, "{}", e.reason);
                }
            }
        }
    }
}
