//! What becomes of a delivered run: pure logic, no I/O, so every outcome sequence can be tested.

use crate::destination::{DeliveryError, DeliveryResult, Retry};
use crate::event::Envelope;
use crate::retry::RetryPolicy;
use crate::store::{EventStatus, Fate, Run, Settlement};
use std::time::Duration;

/// Longest failure reason stored: enough for any broker or handler message, small enough that
/// a chatty error cannot bloat the table.
pub(crate) const MAX_REASON_BYTES: usize = 4096;

/// A reason the database accepts whatever the destination wrote: no NUL byte (PostgreSQL text
/// cannot hold one), at most [`MAX_REASON_BYTES`], cut on a character boundary.
pub(crate) fn clean_reason(reason: &str) -> String {
    let mut clean: String = reason.chars().filter(|&c| c != '\0').collect();
    if clean.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES - 3;
        while !clean.is_char_boundary(end) {
            end -= 1;
        }
        clean.truncate(end);
        clean.push_str("...");
    }
    clean
}

/// What was done with the events of a run that the relay sent, in order. Shorter than the
/// run's events when the run was cut (an event not due yet) or the outcome is unknown.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The first event had been attempted more times than the policy allows without an outcome
    /// (relays that died or stalled on it): it is dead without another attempt.
    GaveUp,
    /// One result per sent event, in order (`sent` events from the start of the run).
    Delivered(Vec<DeliveryResult>),
    /// The delivery did not finish in time or could not start: nothing is known.
    Unknown,
}

/// A decision to log where failures are handled (the relay), once.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Failed {
    pub index: usize,
    pub attempt: u32,
    pub dead: bool,
    pub retry_in: Duration,
    pub reason: String,
}

/// The attempt number of the run's event at `index`: the claim counts attempts on the first
/// event only; the others are on their first attempt.
pub(crate) fn attempt_of(run: &Run, index: usize) -> u32 {
    if index == 0 {
        run.attempts
    } else {
        1
    }
}

/// How many events of `run` to send now: the due prefix, none if the run is given up.
pub(crate) fn sendable(run: &Run, policy: &RetryPolicy) -> usize {
    if gave_up(run, policy) {
        return 0;
    }
    run.events.iter().take_while(|e| e.due).count()
}

pub(crate) fn gave_up(run: &Run, policy: &RetryPolicy) -> bool {
    !run.events.is_empty() && run.attempts > policy.max_attempts
}

/// The settlement of `run` after `outcome`: delivered events leave the pending set, the first
/// failure stops the run (retried with backoff, or dead), events after it stay pending
/// untouched, and the cursor moves past exactly the settled prefix.
pub(crate) fn settle(
    run: &Run,
    outcome: Outcome,
    policy: &RetryPolicy,
    parks: impl Fn(&Envelope) -> bool,
) -> (Settlement, Option<Failed>) {
    let mut s = Settlement {
        aggregate_type: run.aggregate_type.clone(),
        aggregate_id: run.aggregate_id.clone(),
        from_seq: run.done_seq,
        done_seq: run.done_seq,
        attempts: 0,
        delay: Duration::ZERO,
        not_before: None,
        park: false,
        events: Vec::new(),
    };
    if run.events.is_empty() {
        // Nothing pending up to what the relay knows of (delivered or dead meanwhile).
        if run.complete {
            s.done_seq = run.known_seq;
        }
        return (s, None);
    }
    let results = match outcome {
        Outcome::GaveUp => {
            let head = &run.events[0];
            let reason = clean_reason(&format!(
                "gave up after {} attempts that ended without an outcome (the relay stopped, \
                 crashed or timed out while delivering it); last error: {}",
                run.attempts - 1,
                head.last_error.as_deref().unwrap_or("none")
            ));
            if parks(&head.envelope) {
                s.park = true;
            } else {
                s.done_seq = head.envelope.sequence;
            }
            s.events.push(Fate {
                id: head.envelope.id,
                status: EventStatus::Dead,
                attempts: run.attempts - 1,
                reason: Some(reason.clone()),
            });
            return (
                s,
                Some(Failed {
                    index: 0,
                    attempt: run.attempts - 1,
                    dead: true,
                    retry_in: Duration::ZERO,
                    reason,
                }),
            );
        }
        Outcome::Unknown => Vec::new(),
        Outcome::Delivered(results) => results,
    };
    let mut results = results.into_iter();
    for (index, event) in run.events.iter().enumerate() {
        let attempt = attempt_of(run, index);
        let Some(result) = results.next() else {
            // Not sent: not due yet, or the outcome is unknown.
            if !event.due {
                s.not_before = Some(event.available_at);
            }
            if index == 0 {
                // No outcome for the first event: a claim that delivered nothing keeps the
                // attempt only if it tried (a timeout), not if the event was not due.
                s.attempts = if event.due {
                    run.attempts
                } else {
                    run.attempts - 1
                };
                if event.due {
                    s.delay = policy.delay(run.attempts).min(policy.max_delay);
                }
            }
            return (s, None);
        };
        match result {
            Ok(()) => {
                s.done_seq = event.envelope.sequence;
                s.events.push(Fate {
                    id: event.envelope.id,
                    status: EventStatus::Delivered,
                    attempts: attempt,
                    reason: None,
                });
            }
            Err(DeliveryError { retry, reason }) => {
                let reason = clean_reason(&reason);
                // An outage is not the event's fault: the attempt is given back.
                let attempt = if retry == Retry::Unavailable {
                    attempt - 1
                } else {
                    attempt
                };
                let next = policy
                    .next_delay(attempt, retry)
                    .map(|d| d.min(policy.max_delay));
                let failed = Failed {
                    index,
                    attempt,
                    dead: next.is_none(),
                    retry_in: next.unwrap_or_default(),
                    reason: reason.clone(),
                };
                match next {
                    None => {
                        // Parked: the cursor stays before the dead event until it is requeued
                        // or discarded.
                        if parks(&event.envelope) {
                            s.park = true;
                        } else {
                            s.done_seq = event.envelope.sequence;
                        }
                        s.events.push(Fate {
                            id: event.envelope.id,
                            status: EventStatus::Dead,
                            attempts: attempt,
                            reason: Some(reason),
                        });
                    }
                    Some(delay) => {
                        s.attempts = attempt;
                        s.delay = delay;
                        s.events.push(Fate {
                            id: event.envelope.id,
                            status: EventStatus::Pending,
                            attempts: attempt,
                            reason: Some(reason),
                        });
                    }
                }
                return (s, Some(failed));
            }
        }
    }
    // Every event of the run delivered.
    if run.complete {
        s.done_seq = run.known_seq;
    }
    (s, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Headers;
    use crate::store::RunEvent;
    use chrono::Utc;
    use proptest::prelude::*;
    use uuid::Uuid;

    fn run(n: usize, attempts: u32, done_seq: i64, complete: bool) -> Run {
        Run {
            aggregate_type: "cart".into(),
            aggregate_id: "c1".into(),
            done_seq,
            known_seq: done_seq + n as i64 + if complete { 0 } else { 5 },
            attempts,
            complete,
            events: (0..n)
                .map(|i| RunEvent {
                    envelope: Envelope {
                        id: Uuid::now_v7(),
                        created_at: Utc::now(),
                        event_type: "t".into(),
                        aggregate_type: "cart".into(),
                        aggregate_id: "c1".into(),
                        sequence: done_seq + 1 + i as i64,
                        schema_version: 1,
                        topic: "t".into(),
                        payload: "{}".into(),
                        headers: Headers::new(),
                        attempt: 1,
                    },
                    due: true,
                    available_at: Utc::now(),
                    last_error: None,
                })
                .collect(),
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy::exponential(Duration::from_millis(100))
            .max_attempts(3)
            .max_delay(Duration::from_secs(10))
            .jitter(false)
    }

    #[test]
    fn reasons_lose_nul_bytes_and_stay_short() {
        assert_eq!(clean_reason("a\0b"), "ab");
        let long = "é".repeat(5000);
        let clean = clean_reason(&long);
        assert!(clean.len() <= MAX_REASON_BYTES, "{}", clean.len());
        assert!(clean.ends_with("..."));
    }

    #[test]
    fn a_failure_in_the_middle_settles_the_prefix_and_keeps_the_rest() {
        let r = run(5, 1, 10, true);
        let results = vec![
            Ok(()),
            Ok(()),
            Err(DeliveryError::retry("broker said no\0")),
            Ok(()),
            Ok(()),
        ];
        let (s, failed) = settle(&r, Outcome::Delivered(results), &policy(), |_| false);
        assert_eq!(s.done_seq, 12);
        assert_eq!(s.attempts, 1);
        assert_eq!(s.delay, Duration::from_millis(100));
        assert_eq!(s.events.len(), 3);
        assert_eq!(s.events[2].status, EventStatus::Pending);
        assert_eq!(s.events[2].reason.as_deref(), Some("broker said no"));
        assert!(!failed.unwrap().dead);
    }

    #[test]
    fn a_dead_event_parks_its_aggregate_when_asked() {
        let r = run(3, 1, 5, true);
        let results = vec![Ok(()), Err(DeliveryError::permanent("refused"))];
        let (s, _) = settle(&r, Outcome::Delivered(results.clone()), &policy(), |_| true);
        assert!(s.park);
        assert_eq!(s.done_seq, 6, "the cursor stays before the dead event");
        assert_eq!(s.events[1].status, EventStatus::Dead);
        let (s, _) = settle(&r, Outcome::Delivered(results), &policy(), |_| false);
        assert!(!s.park);
        assert_eq!(s.done_seq, 7);
    }

    #[test]
    fn an_unreachable_destination_burns_no_attempt() {
        let r = run(2, 3, 0, true);
        let results = vec![Err(DeliveryError::unavailable("no responders"))];
        let (s, failed) = settle(&r, Outcome::Delivered(results), &policy(), |_| false);
        assert_eq!((s.done_seq, s.attempts), (0, 2));
        assert_eq!(s.events[0].status, EventStatus::Pending);
        assert!(!failed.unwrap().dead, "even at the last attempt");
    }

    #[test]
    fn an_absurd_delay_is_clamped_to_the_policy_maximum() {
        let r = run(1, 1, 0, true);
        let results = vec![Err(DeliveryError::retry_after(
            Duration::from_secs(u64::MAX),
            "later",
        ))];
        let (s, _) = settle(&r, Outcome::Delivered(results), &policy(), |_| false);
        assert_eq!(s.delay, Duration::from_secs(10));
    }

    #[test]
    fn an_event_past_its_attempts_dies_at_claim_with_its_last_reason() {
        let mut r = run(1, 4, 7, true);
        r.events[0].last_error = Some("boom".into());
        assert_eq!(sendable(&r, &policy()), 0);
        let (s, failed) = settle(&r, Outcome::GaveUp, &policy(), |_| false);
        assert_eq!(s.done_seq, 8);
        assert_eq!(s.events[0].status, EventStatus::Dead);
        assert!(s.events[0].reason.as_deref().unwrap().contains("boom"));
        assert!(failed.unwrap().dead);
    }

    #[test]
    fn an_event_not_due_cuts_the_run_without_burning_an_attempt() {
        let mut r = run(3, 1, 0, true);
        r.events[1].due = false;
        assert_eq!(sendable(&r, &policy()), 1);
        let (s, _) = settle(&r, Outcome::Delivered(vec![Ok(())]), &policy(), |_| false);
        assert_eq!(s.done_seq, 1);
        assert_eq!(s.not_before, Some(r.events[1].available_at));
        let mut r = run(2, 1, 0, true);
        r.events[0].due = false;
        let (s, _) = settle(&r, Outcome::Delivered(vec![]), &policy(), |_| false);
        assert_eq!((s.done_seq, s.attempts), (0, 0));
    }

    #[test]
    fn an_unknown_outcome_keeps_the_attempt_and_backs_off() {
        let r = run(3, 2, 0, true);
        let (s, failed) = settle(&r, Outcome::Unknown, &policy(), |_| false);
        assert_eq!((s.done_seq, s.attempts), (0, 2));
        assert!(s.delay > Duration::ZERO);
        assert!(s.events.is_empty() && failed.is_none());
    }

    #[test]
    fn a_complete_run_moves_the_cursor_to_what_is_known() {
        let r = run(0, 1, 4, true);
        let (s, _) = settle(&r, Outcome::Delivered(vec![]), &policy(), |_| false);
        assert_eq!(s.done_seq, r.known_seq);
        let r = run(2, 1, 4, false);
        let (s, _) = settle(
            &r,
            Outcome::Delivered(vec![Ok(()), Ok(())]),
            &policy(),
            |_| false,
        );
        assert_eq!(s.done_seq, 6);
    }

    fn result() -> impl Strategy<Value = DeliveryResult> {
        prop_oneof![
            3 => Just(Ok(())),
            1 => Just(Err(DeliveryError::retry("transient"))),
            1 => Just(Err(DeliveryError::permanent("refused"))),
            1 => Just(Err(DeliveryError::unavailable("no responders"))),
            1 => (0u64..u64::MAX).prop_map(|s| Err(DeliveryError::retry_after(Duration::from_secs(s), "later"))),
        ]
    }

    proptest! {
        /// Over random outcomes: the cursor moves exactly past the settled prefix, nothing after
        /// the first failure is settled, and every settled event is in sequence order.
        #[test]
        fn settles_exactly_the_prefix(
            n in 1usize..20,
            attempts in 1u32..3,
            complete: bool,
            results in proptest::collection::vec(result(), 0..20),
        ) {
            let r = run(n, attempts, 100, complete);
            let sent = results.len().min(n);
            let results: Vec<_> = results.into_iter().take(sent).collect();
            let first_failure = results.iter().position(|r| r.is_err());
            let (s, failed) = settle(&r, Outcome::Delivered(results.clone()), &policy(), |_| false);
            let settled = first_failure.map_or(sent, |i| i + 1);
            prop_assert_eq!(s.events.len(), settled);
            for (i, fate) in s.events.iter().enumerate() {
                prop_assert_eq!(fate.id, r.events[i].envelope.id);
                let expected_delivered = first_failure != Some(i);
                prop_assert_eq!(fate.status == EventStatus::Delivered, expected_delivered);
            }
            prop_assert!(s.delay <= Duration::from_secs(10));
            match (first_failure, failed) {
                (Some(i), Some(f)) => {
                    prop_assert_eq!(f.index, i);
                    let seq = r.events[i].envelope.sequence;
                    prop_assert_eq!(s.done_seq, if f.dead { seq } else { seq - 1 });
                }
                (None, None) => {
                    let expected = if sent == n && complete {
                        r.known_seq
                    } else if sent == 0 {
                        100
                    } else {
                        r.events[sent - 1].envelope.sequence
                    };
                    prop_assert_eq!(s.done_seq, expected);
                }
                other => prop_assert!(false, "{other:?}"),
            }
            prop_assert!(s.done_seq >= r.done_seq);
        }
    }
}
