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

/// How many events of `run` to send now: the due prefix, none if the run is given up, and
/// nothing after an event whose type parks its aggregate when it dies (so that nothing can
/// overtake it if it does).
pub(crate) fn sendable(
    run: &Run,
    policy: &RetryPolicy,
    parks: impl Fn(&Envelope) -> bool,
) -> usize {
    if gave_up(run, policy) {
        return 0;
    }
    let due = run.events.iter().take_while(|e| e.due).count();
    run.events[..due]
        .iter()
        .position(|e| parks(&e.envelope))
        .map_or(due, |i| i + 1)
}

/// The first `n` events of `run` as the destination gets them, each with its attempt number.
pub(crate) fn envelopes(run: &Run, n: usize) -> impl Iterator<Item = Envelope> + '_ {
    run.events[..n].iter().enumerate().map(|(i, e)| {
        let mut envelope = e.envelope.clone();
        envelope.attempt = attempt_of(run, i);
        envelope
    })
}

pub(crate) fn gave_up(run: &Run, policy: &RetryPolicy) -> bool {
    !run.events.is_empty() && run.attempts > policy.max_attempts
}

/// The settlement of `run` after `outcome`, in `seq` order: a delivered event leaves the
/// pending set; a dead event is recorded and the run goes on (or, if its type parks, the
/// aggregate stops there); the first event to retry, or not tried, stops the run, and the
/// events after it stay pending untouched. The cursor moves past exactly the settled prefix.
/// Returns the failures to log, once each.
pub(crate) fn settle(
    run: &Run,
    outcome: Outcome,
    policy: &RetryPolicy,
    parks: impl Fn(&Envelope) -> bool,
) -> (Settlement, Vec<Failed>) {
    let mut s = Settlement {
        aggregate_type: run.aggregate_type.clone(),
        aggregate_id: run.aggregate_id.clone(),
        version: run.version,
        done_seq: run.done_seq,
        attempts: 0,
        delay: Duration::ZERO,
        not_before: None,
        park_at: run.parked_seq,
        new_park: None,
        events: Vec::new(),
    };
    let mut failures = Vec::new();
    if run.events.is_empty() {
        // Nothing pending up to where the run may go (delivered or dead meanwhile).
        if run.complete {
            s.done_seq = run.limit_seq();
        }
        return (s, failures);
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
                s.park_at = Some(head.envelope.sequence);
                s.new_park = s.park_at;
            } else {
                s.done_seq = head.envelope.sequence;
            }
            s.events.push(Fate {
                id: head.envelope.id,
                status: EventStatus::Dead,
                attempts: run.attempts - 1,
                reason: Some(reason.clone()),
            });
            failures.push(Failed {
                index: 0,
                attempt: run.attempts - 1,
                dead: true,
                retry_in: Duration::ZERO,
                reason,
            });
            return (s, failures);
        }
        Outcome::Unknown => Vec::new(),
        Outcome::Delivered(results) => results,
    };
    let mut results = results.into_iter();
    let mut progressed = false;
    for (index, event) in run.events.iter().enumerate() {
        let attempt = attempt_of(run, index);
        let result = results.next();
        let not_tried = match &result {
            None => true,
            Some(Err(e)) => e.retry == Retry::NotAttempted,
            Some(Ok(())) => false,
        };
        if not_tried {
            // Not sent: not due yet, cut, not tried, or the outcome is unknown.
            if !event.due {
                s.not_before = Some(event.available_at);
            }
            if !progressed {
                // Nothing settled: the claim's attempt at the first event counts only if it
                // was tried and its outcome is unknown (a time-out).
                let unknown = result.is_none() && event.due && index == 0;
                s.attempts = if unknown {
                    run.attempts
                } else {
                    run.attempts.saturating_sub(1)
                };
                if unknown {
                    s.delay = policy.delay(run.attempts).min(policy.max_delay);
                }
            }
            return (s, failures);
        }
        match result.expect("checked above") {
            Ok(()) => {
                progressed = true;
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
                failures.push(Failed {
                    index,
                    attempt,
                    dead: next.is_none(),
                    retry_in: next.unwrap_or_default(),
                    reason: reason.clone(),
                });
                match next {
                    None => {
                        s.events.push(Fate {
                            id: event.envelope.id,
                            status: EventStatus::Dead,
                            attempts: attempt,
                            reason: Some(reason),
                        });
                        if parks(&event.envelope) {
                            // The cursor stays before the dead event until it is requeued or
                            // discarded.
                            s.park_at = Some(event.envelope.sequence);
                            s.new_park = s.park_at;
                            return (s, failures);
                        }
                        // Skipped: the run goes on (later events a pipelined broker already
                        // took are recorded as delivered, not sent again).
                        progressed = true;
                        s.done_seq = event.envelope.sequence;
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
                        return (s, failures);
                    }
                }
            }
        }
    }
    // Every event of the run settled.
    if run.complete {
        s.done_seq = run.limit_seq();
    }
    (s, failures)
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
            parked_seq: None,
            version: 0,
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
        assert!(!failed[0].dead);
    }

    #[test]
    fn a_dead_event_parks_its_aggregate_when_asked() {
        let r = run(3, 1, 5, true);
        let results = vec![Ok(()), Err(DeliveryError::permanent("refused"))];
        let (s, _) = settle(&r, Outcome::Delivered(results.clone()), &policy(), |_| true);
        assert_eq!(s.park_at, Some(7));
        assert_eq!(s.done_seq, 6, "the cursor stays before the dead event");
        assert_eq!(s.events[1].status, EventStatus::Dead);
        assert_eq!(
            sendable(&r, &policy(), |_| true),
            1,
            "nothing after a parking event"
        );
        let (s, _) = settle(&r, Outcome::Delivered(results), &policy(), |_| false);
        assert_eq!(s.park_at, None);
        assert_eq!(s.done_seq, 7);
    }

    #[test]
    fn a_dead_event_is_skipped_and_the_run_goes_on() {
        let r = run(3, 1, 0, true);
        let results = vec![Err(DeliveryError::permanent("unroutable")), Ok(()), Ok(())];
        let (s, failed) = settle(&r, Outcome::Delivered(results), &policy(), |_| false);
        assert_eq!(s.done_seq, 3, "what the broker took is not sent again");
        assert_eq!(
            s.events.iter().map(|f| f.status).collect::<Vec<_>>(),
            [
                EventStatus::Dead,
                EventStatus::Delivered,
                EventStatus::Delivered
            ]
        );
        assert_eq!(failed.len(), 1);
    }

    #[test]
    fn events_not_tried_stay_pending_without_an_attempt() {
        let r = run(3, 1, 0, true);
        let results = vec![
            Ok(()),
            Err(DeliveryError::not_attempted("earlier failure")),
            Ok(()),
        ];
        let (s, failed) = settle(&r, Outcome::Delivered(results), &policy(), |_| false);
        assert_eq!((s.done_seq, s.attempts, s.delay), (1, 0, Duration::ZERO));
        assert!(failed.is_empty());
        let r = run(2, 2, 0, true);
        let results = vec![Err(DeliveryError::not_attempted("router round"))];
        let (s, _) = settle(&r, Outcome::Delivered(results), &policy(), |_| false);
        assert_eq!(
            (s.done_seq, s.attempts),
            (0, 1),
            "the claim's attempt is given back"
        );
    }

    #[test]
    fn a_parked_aggregate_settles_up_to_its_dead_event_only() {
        let mut r = run(1, 1, 0, true);
        r.known_seq = 5;
        r.parked_seq = Some(3);
        assert_eq!(r.limit_seq(), 2);
        let (s, _) = settle(&r, Outcome::Delivered(vec![Ok(())]), &policy(), |_| true);
        assert_eq!((s.done_seq, s.park_at), (2, Some(3)));
    }

    #[test]
    fn an_unreachable_destination_burns_no_attempt() {
        let r = run(2, 3, 0, true);
        let results = vec![Err(DeliveryError::unavailable("no responders"))];
        let (s, failed) = settle(&r, Outcome::Delivered(results), &policy(), |_| false);
        assert_eq!((s.done_seq, s.attempts), (0, 2));
        assert_eq!(s.events[0].status, EventStatus::Pending);
        assert!(!failed[0].dead, "even at the last attempt");
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
        assert_eq!(sendable(&r, &policy(), |_| false), 0);
        let (s, failed) = settle(&r, Outcome::GaveUp, &policy(), |_| false);
        assert_eq!(s.done_seq, 8);
        assert_eq!(s.events[0].status, EventStatus::Dead);
        assert!(s.events[0].reason.as_deref().unwrap().contains("boom"));
        assert!(failed[0].dead);
    }

    #[test]
    fn an_event_not_due_cuts_the_run_without_burning_an_attempt() {
        let mut r = run(3, 1, 0, true);
        r.events[1].due = false;
        assert_eq!(sendable(&r, &policy(), |_| false), 1);
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
        assert!(s.events.is_empty() && failed.is_empty());
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
            1 => Just(Err(DeliveryError::not_attempted("earlier failure"))),
            1 => (0u64..u64::MAX).prop_map(|s| Err(DeliveryError::retry_after(Duration::from_secs(s), "later"))),
        ]
    }

    proptest! {
        /// Over random outcomes and both dead-letter policies: the settled events are a prefix
        /// of the run in order; it ends at the first event to retry, not tried, or (parking)
        /// dead; the cursor moves exactly past the settled prefix, never back.
        #[test]
        fn settles_exactly_a_prefix(
            n in 1usize..20,
            attempts in 1u32..3,
            complete: bool,
            park: bool,
            results in proptest::collection::vec(result(), 0..20),
        ) {
            let r = run(n, attempts, 100, complete);
            let sent = results.len().min(n);
            let results: Vec<_> = results.into_iter().take(sent).collect();
            let stops = |res: &DeliveryResult, i: usize| match res {
                Ok(()) => false,
                Err(e) => match e.retry {
                    Retry::NotAttempted | Retry::Unavailable => true,
                    _ => {
                        let attempt = attempt_of(&r, i);
                        policy().next_delay(attempt, e.retry).is_some() || park
                    }
                },
            };
            let stop = results.iter().enumerate().position(|(i, res)| stops(res, i));
            let (s, _) = settle(&r, Outcome::Delivered(results.clone()), &policy(), |_| park);
            // Settled: everything before the stop, plus the stopping event unless not tried.
            let settled = match stop {
                Some(i) if results[i].as_ref().is_err_and(|e| e.retry == Retry::NotAttempted) => i,
                Some(i) => i + 1,
                None => sent,
            };
            prop_assert_eq!(s.events.len(), settled);
            for (i, fate) in s.events.iter().enumerate() {
                prop_assert_eq!(fate.id, r.events[i].envelope.id);
                prop_assert_eq!(fate.status == EventStatus::Delivered, results[i].is_ok());
            }
            prop_assert!(s.delay <= Duration::from_secs(10));
            prop_assert!(s.done_seq >= r.done_seq);
            // The cursor is past every settled event except a retried or parked one.
            let last_past = s.events.iter().rposition(|f| {
                f.status == EventStatus::Delivered || (f.status == EventStatus::Dead && !park)
            });
            if let Some(i) = last_past {
                prop_assert!(s.done_seq >= r.events[i].envelope.sequence);
            }
            if stop.is_none() && sent == n && complete {
                prop_assert_eq!(s.done_seq, r.limit_seq());
            } else {
                let expected = last_past.map_or(r.done_seq, |i| {
                    // Only a contiguous prefix moves the cursor.
                    if (0..=i).all(|j| s.events[j].status != EventStatus::Pending) {
                        r.events[i].envelope.sequence
                    } else {
                        r.done_seq
                    }
                });
                prop_assert_eq!(s.done_seq, expected);
            }
        }
    }
}
