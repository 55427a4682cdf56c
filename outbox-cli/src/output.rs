//! What the commands print: aligned text for people, JSON (`--json`) for scripts.

/// `println!` that ends the command quietly when the reader went away (`outbox dead list |
/// head`) instead of panicking on the broken pipe.
macro_rules! say {
    ($($arg:tt)*) => {
        crate::output::line(format_args!($($arg)*))
    };
}

pub(crate) fn line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(error) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            // The reader has what it wanted.
            std::process::exit(0);
        }
        eprintln!("error: cannot write the output: {error}");
        std::process::exit(1);
    }
}

use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use outbox_core::{DeadGroup, EventRecord, Inconsistency, OutboxStatus, ParkedAggregate};
use serde::Serialize;
use serde_json::json;
use std::time::Duration;

fn print_json(value: &impl Serialize) {
    say!(
        "{}",
        serde_json::to_string_pretty(value).expect("output serialises")
    );
}

/// Rows as columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        say!("  {}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// `1.2 s`, `3 min 4 s`, `2 h 5 min`, `3 d 4 h`.
fn age(ms: i64) -> String {
    let s = ms / 1000;
    match s {
        _ if ms < 10_000 => format!("{:.1} s", ms as f64 / 1000.0),
        0..=59 => format!("{s} s"),
        60..=3599 => two(s / 60, "min", s % 60, "s"),
        3600..=86_399 => two(s / 3600, "h", s % 3600 / 60, "min"),
        _ => two(s / 86_400, "d", s % 86_400 / 3600, "h"),
    }
}

/// `5 min`, `5 min 3 s`.
fn two(big: i64, big_unit: &str, small: i64, small_unit: &str) -> String {
    if small == 0 {
        format!("{big} {big_unit}")
    } else {
        format!("{big} {big_unit} {small} {small_unit}")
    }
}

fn since(at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    at.map(|at| format!("{} ago", age((now - at).num_milliseconds().max(0))))
        .unwrap_or_else(|| "-".into())
}

/// One line of a reason: the first line, at most 100 characters.
fn short(reason: Option<&str>) -> String {
    let line = reason.unwrap_or("").lines().next().unwrap_or("");
    if line.chars().count() > 100 {
        format!("{}…", line.chars().take(99).collect::<String>())
    } else {
        line.to_owned()
    }
}

pub(crate) fn done(json: bool, action: &str, value: &serde_json::Value) {
    if json {
        print_json(&json!({ "action": action, "result": value }));
    } else {
        say!("{action}: done");
    }
}

pub(crate) fn status(json: bool, table_name: &str, status: &OutboxStatus, stuck_after: Duration) {
    if json {
        let mut value = serde_json::to_value(status).expect("status serialises");
        value["table"] = json!(table_name);
        print_json(&value);
        return;
    }
    let now = status.read_at;
    say!("outbox {table_name:?} at {}", now.to_rfc3339());
    let lag = status
        .oldest_pending_age_ms
        .map(|ms| format!("oldest due event waiting {}", age(ms)))
        .unwrap_or_else(|| "nothing due".into());
    say!("  pending    {:>10}   {lag}", status.pending);
    say!("  delivered  {:>10}   still in the table", status.delivered);
    let dead = if status.dead > 0 {
        "by cause: outbox dead groups"
    } else {
        ""
    };
    say!("  dead       {:>10}   {dead}", status.dead);
    say!(
        "  relays leasing {} ({} leases), aggregates leased {}, retrying {}, parked {}",
        status.relays_leasing,
        status.leases,
        status.aggregates_leased,
        status.aggregates_retrying,
        status.aggregates_parked
    );
    if !status.counts.is_empty() {
        say!("\nby event type:");
        let rows: Vec<Vec<String>> = status
            .counts
            .iter()
            .map(|c| {
                vec![
                    c.status.as_str().into(),
                    c.event_type.clone(),
                    c.count.to_string(),
                ]
            })
            .collect();
        table(&["STATUS", "EVENT TYPE", "COUNT"], &rows);
    }
    let threshold = age(i64::try_from(stuck_after.as_millis()).unwrap_or(i64::MAX));
    if status.stuck.is_empty() {
        say!("\nno aggregate held back longer than {threshold}");
    } else {
        say!("\nstuck: oldest pending event older than {threshold}");
        let rows: Vec<Vec<String>> = status
            .stuck
            .iter()
            .map(|s| {
                vec![
                    format!("{}:{}", s.aggregate_type, s.aggregate_id),
                    s.pending.to_string(),
                    since(Some(s.oldest_created_at), now),
                    s.attempts.to_string(),
                    s.parked_seq
                        .map(|seq| format!("parked at {seq}"))
                        .unwrap_or_default(),
                    short(s.last_error.as_deref()),
                ]
            })
            .collect();
        table(
            &[
                "AGGREGATE",
                "PENDING",
                "OLDEST",
                "ATTEMPTS",
                "PARKED",
                "LAST ERROR",
            ],
            &rows,
        );
    }
}

pub(crate) fn check(json: bool, problems: &[Inconsistency]) {
    if json {
        let list: Vec<_> = problems
            .iter()
            .map(|p| {
                json!({
                    "aggregate_type": p.aggregate_type,
                    "aggregate_id": p.aggregate_id,
                    "problem": p.problem,
                })
            })
            .collect();
        print_json(&json!({ "inconsistencies": list }));
    } else if problems.is_empty() {
        say!("consistent: every pending event will be claimed");
    } else {
        for p in problems {
            say!("{}:{}: {}", p.aggregate_type, p.aggregate_id, p.problem);
        }
    }
}

pub(crate) fn dead_list(json: bool, records: &[EventRecord]) {
    if json {
        return print_json(&records);
    }
    if records.is_empty() {
        return say!("no dead events");
    }
    let now = Utc::now();
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.event_type.clone(),
                format!("{}:{}", r.aggregate_type, r.aggregate_id),
                r.attempts.to_string(),
                since(r.dead_at, now),
                short(r.last_error.as_deref()),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "EVENT TYPE",
            "AGGREGATE",
            "ATTEMPTS",
            "DIED",
            "REASON",
        ],
        &rows,
    );
}

pub(crate) fn record(json: bool, r: &EventRecord) {
    if json {
        return print_json(r);
    }
    let time = |t: Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into());
    say!("event        {}", r.id);
    say!("type         {} v{}", r.event_type, r.schema_version);
    say!(
        "aggregate    {}:{} (seq {})",
        r.aggregate_type,
        r.aggregate_id,
        r.sequence
    );
    say!("route        {}", r.topic);
    say!(
        "status       {} after {} attempt(s)",
        r.status.as_str(),
        r.attempts
    );
    say!("created      {}", r.created_at.to_rfc3339());
    say!("due          {}", r.available_at.to_rfc3339());
    say!("delivered    {}", time(r.delivered_at));
    say!("dead         {}", time(r.dead_at));
    say!("consumed     {}", time(r.consumed_at));
    say!("last reason  {}", r.last_error.as_deref().unwrap_or("-"));
    if !r.failures.is_empty() {
        say!("failed attempts (the last ten)");
        for f in &r.failures {
            let gave_up = if f.dead { ", gave up" } else { "" };
            say!(
                "  #{} at {}{gave_up}: {}",
                f.attempt,
                f.at.to_rfc3339(),
                f.reason
            );
        }
    }
    say!("headers");
    for (name, value) in &r.headers {
        say!("  {name}: {value}");
    }
    let payload = serde_json::from_str::<serde_json::Value>(&r.payload)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| r.payload.clone());
    say!("payload\n{payload}");
}

pub(crate) fn groups(json: bool, groups: &[DeadGroup]) {
    if json {
        return print_json(&groups);
    }
    if groups.is_empty() {
        return say!("no dead events");
    }
    let now = Utc::now();
    let rows: Vec<Vec<String>> = groups
        .iter()
        .map(|g| {
            vec![
                g.fingerprint.clone(),
                g.count.to_string(),
                g.event_type.clone(),
                since(g.last_dead_at, now),
                short(Some(&g.reason)),
            ]
        })
        .collect();
    table(&["GROUP", "COUNT", "EVENT TYPE", "LAST", "REASON"], &rows);
    say!("\nact on a group: outbox requeue --group GROUP (or discard), with --dry-run first");
}

pub(crate) fn parked(json: bool, parked: &[ParkedAggregate]) {
    if json {
        return print_json(&parked);
    }
    if parked.is_empty() {
        return say!("no parked aggregates");
    }
    let now = Utc::now();
    let rows: Vec<Vec<String>> = parked
        .iter()
        .map(|p| {
            vec![
                format!("{}:{}", p.aggregate_type, p.aggregate_id),
                p.parked_seq.to_string(),
                p.event_id.map(|id| id.to_string()).unwrap_or_default(),
                p.waiting.to_string(),
                since(p.dead_at, now),
                short(p.reason.as_deref()),
            ]
        })
        .collect();
    table(
        &[
            "AGGREGATE",
            "SEQ",
            "DEAD EVENT",
            "WAITING",
            "SINCE",
            "REASON",
        ],
        &rows,
    );
}

pub(crate) fn action(json: bool, action: &str, past: &str, count: u64, dry_run: bool) {
    if json {
        print_json(&json!({ "action": action, "dry_run": dry_run, "count": count }));
    } else if dry_run {
        say!("would have {past} {count} (dry run: nothing changed)");
    } else {
        say!("{past} {count}");
    }
}

pub(crate) fn progress(json: bool, total: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(total),
        if json {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        },
    );
    bar.set_style(
        ProgressStyle::with_template(
            "purging {bar:40} {human_pos}/{human_len} rows, {per_sec}, ETA {eta}",
        )
        .expect("a valid template"),
    );
    bar
}

pub(crate) fn purged(json: bool, purged: u64, total: u64, interrupted: bool) {
    if json {
        print_json(&json!({
            "action": "purge", "purged": purged, "estimated": total, "interrupted": interrupted,
        }));
    } else if interrupted {
        say!("interrupted: purged {purged} of about {total}; the rest is untouched");
    } else {
        say!("purged {purged}");
    }
}
