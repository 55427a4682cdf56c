//! `outbox`: see and steer an outbox without writing SQL.
//!
//! ```text
//! outbox --url postgres://app@db/app status
//! outbox --url mysql://app@db/app status
//! outbox dead groups
//! outbox requeue --group 3f2a9c01b7de --dry-run
//! outbox purge --older-than 7d
//! ```
//!
//! Exit codes: 0 done; 1 the database failed (unreachable, SQL error); 2 bad usage (an unknown
//! flag, a malformed id, time or filter); 3 the outbox table does not exist (run
//! `outbox migrate`); 4 `check` found inconsistencies; 5 `dead show` found no such event; 130
//! `purge` interrupted (what it purged stays purged, the rest is untouched).

mod args;
mod output;
mod parse;

use args::{Cli, Command, DeadCommand, FilterArgs, ParkedCommand};
use clap::Parser;
use outbox_core::{Backend, EventFilter, FullStore, Outbox, Retention, Store, TableLayout};
use serde_json::json;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// An error and the exit code it ends the process with.
#[derive(Debug)]
pub(crate) struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Self {
            code: 2,
            message: message.into(),
        }
    }

    fn database(error: outbox_core::Error) -> Self {
        let code = match error {
            outbox_core::Error::InvalidField { .. }
            | outbox_core::Error::InvalidTableName { .. }
            | outbox_core::Error::Config(_) => 2,
            _ => 1,
        };
        Self {
            code,
            message: error.to_string(),
        }
    }
}

impl From<outbox_core::Error> for Failure {
    fn from(error: outbox_core::Error) -> Self {
        Self::database(error)
    }
}

impl From<sqlx::Error> for Failure {
    fn from(error: sqlx::Error) -> Self {
        Self::database(error.into())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("OUTBOX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(failure) => {
            eprintln!("error: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

async fn run(cli: Cli) -> Result<u8, Failure> {
    let shown = parse::redact(&cli.url);
    if cli.url.starts_with("postgres://") || cli.url.starts_with("postgresql://") {
        let options = cli
            .url
            .parse::<sqlx::postgres::PgConnectOptions>()
            .map_err(|e| Failure::usage(format!("bad PostgreSQL URL {shown}: {e}")))?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| connect_failure(&shown, e))?;
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_tables
             WHERE tablename = $1 AND schemaname = ANY(current_schemas(false)))",
        )
        .bind(format!("{}_cursors", cli.table))
        .fetch_one(&pool)
        .await?;
        let outbox = Outbox::builder(pool)
            .table(&cli.table)
            .layout(cli.layout())
            .build()?;
        execute(cli, outbox, exists, &shown).await
    } else if cli.url.starts_with("sqlite:") {
        let create = matches!(cli.command, Command::Migrate { .. });
        let options = cli
            .url
            .parse::<sqlx::sqlite::SqliteConnectOptions>()
            .map_err(|e| Failure::usage(format!("bad SQLite URL {shown}: {e}")))?
            .create_if_missing(create)
            .busy_timeout(std::time::Duration::from_secs(10));
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .map_err(|e| connect_failure(&shown, e))?;
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
        )
        .bind(format!("{}_cursors", cli.table))
        .fetch_one(&pool)
        .await?;
        let outbox = Outbox::builder(pool)
            .table(&cli.table)
            .layout(cli.layout())
            .build()?;
        execute(cli, outbox, exists, &shown).await
    } else if cli.url.starts_with("mysql://") || cli.url.starts_with("mariadb://") {
        // sqlx knows only the `mysql` scheme; MariaDB speaks the same protocol.
        let url = cli.url.replacen("mariadb://", "mysql://", 1);
        let options = url
            .parse::<sqlx::mysql::MySqlConnectOptions>()
            .map_err(|e| Failure::usage(format!("bad MySQL URL {shown}: {e}")))?;
        let pool = sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect_with(options)
            .await
            .map_err(|e| connect_failure(&shown, e))?;
        let found: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM information_schema.tables
             WHERE table_schema = DATABASE() AND table_name = ?",
        )
        .bind(format!("{}_cursors", cli.table))
        .fetch_one(&pool)
        .await?;
        let outbox = Outbox::builder(pool)
            .table(&cli.table)
            .layout(cli.layout())
            .build()?;
        execute(cli, outbox, found > 0, &shown).await
    } else {
        Err(Failure::usage(format!(
            "unsupported database URL {shown}: use postgres://…, mysql://… (or mariadb://…) or sqlite:…"
        )))
    }
}

fn connect_failure(shown: &str, error: sqlx::Error) -> Failure {
    Failure {
        code: 1,
        message: format!("cannot connect to {shown}: {error}"),
    }
}

async fn execute<DB>(cli: Cli, outbox: Outbox<DB>, exists: bool, shown: &str) -> Result<u8, Failure>
where
    DB: Backend,
    DB::Store: FullStore,
{
    let json = cli.json;
    if !exists && !matches!(cli.command, Command::Migrate { .. }) {
        return Err(Failure {
            code: 3,
            message: format!(
                "no outbox table {:?} (or it predates the relay's cursors) in {shown}; \
                 create or upgrade it with `outbox migrate`",
                cli.table
            ),
        });
    }
    match cli.command {
        Command::Migrate { .. } => {
            outbox.migrate().await?;
            let layout = match cli.layout() {
                TableLayout::Debezium => "debezium",
                TableLayout::Partitioned(_) => "partitioned",
                _ => "standard",
            };
            output::done(
                json,
                "migrate",
                &json!({ "table": cli.table, "layout": layout }),
            );
        }
        Command::Status { stuck_after } => {
            let status = outbox.status(stuck_after.0).await?;
            output::status(json, &cli.table, &status, stuck_after.0);
        }
        Command::Check => {
            let problems = outbox.check().await?;
            output::check(json, &problems);
            if !problems.is_empty() {
                return Ok(4);
            }
        }
        Command::Dead { command } => match command {
            DeadCommand::List { filter, limit } => {
                let records = outbox.dead(&filter.to_filter()?, limit).await?;
                output::dead_list(json, &records);
            }
            DeadCommand::Show { id } => {
                let id = parse::uuid(&id)?;
                let record = outbox.get(id).await?.ok_or_else(|| Failure {
                    code: 5,
                    message: format!(
                        "no event {id} in table {:?} (discarded and purged events are in {}_archive)",
                        cli.table, cli.table
                    ),
                })?;
                output::record(json, &record);
            }
            DeadCommand::Groups { filter } => {
                let groups = outbox.dead_groups(&filter.to_filter()?).await?;
                output::groups(json, &groups);
            }
        },
        Command::Requeue { filter, dry_run } => {
            let n = outbox
                .requeue_dead(&filter.to_action_filter()?, dry_run)
                .await?;
            output::action(json, "requeue", "requeued", n, dry_run);
        }
        Command::Discard { filter, dry_run } => {
            let n = outbox
                .discard_dead(&filter.to_action_filter()?, dry_run)
                .await?;
            output::action(json, "discard", "discarded", n, dry_run);
        }
        Command::Republish { filter, dry_run } => {
            let filter = filter.to_action_filter()?;
            let n = if dry_run {
                outbox.republish_dry_run(&filter).await?
            } else {
                outbox.republish(&filter).await?
            };
            output::action(json, "republish", "republished", n, dry_run);
        }
        Command::Parked { command } => match command {
            ParkedCommand::List { limit } => {
                output::parked(json, &outbox.parked(limit).await?);
            }
            ParkedCommand::Release {
                aggregate,
                all,
                dry_run,
            } => {
                if aggregate.is_empty() && !all {
                    return Err(Failure::usage(
                        "name the aggregates to release with --aggregate TYPE:ID, or --all",
                    ));
                }
                let wanted: Vec<(String, String)> = aggregate
                    .iter()
                    .map(|a| parse::aggregate(a))
                    .collect::<Result<_, _>>()?;
                let mut released = 0;
                for parked in outbox.parked(usize::MAX).await? {
                    let key = (parked.aggregate_type.clone(), parked.aggregate_id.clone());
                    if !all && !wanted.contains(&key) {
                        continue;
                    }
                    let Some(event) = parked.event_id else {
                        continue;
                    };
                    if dry_run || outbox.discard(event).await? {
                        released += 1;
                    }
                }
                output::action(json, "release", "released", released, dry_run);
            }
        },
        Command::Purge {
            older_than,
            archive,
            batch_size,
            dry_run,
        } => {
            let retention = if archive {
                Retention::archive_after(older_than.0)
            } else {
                Retention::delete_after(older_than.0)
            }
            .batch_size(batch_size);
            return purge(json, &outbox, &retention, batch_size, dry_run).await;
        }
    }
    Ok(0)
}

/// Batch after batch, each its own short statement, with a progress bar; Ctrl-C stops after the
/// batch in flight, so nothing is left half done.
async fn purge<DB>(
    json: bool,
    outbox: &Outbox<DB>,
    retention: &Retention,
    batch_size: usize,
    dry_run: bool,
) -> Result<u8, Failure>
where
    DB: Backend,
    DB::Store: FullStore,
{
    let total = outbox.purgeable(retention).await?;
    if dry_run {
        output::action(json, "purge", "purged", total, true);
        return Ok(0);
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            flag.store(true, Ordering::SeqCst);
        }
    });
    let bar = output::progress(json, total);
    let (mut purged, mut stopped) = (0u64, false);
    loop {
        if interrupted.load(Ordering::SeqCst) {
            stopped = true;
            break;
        }
        let n = match outbox.store().purge_batch(retention).await {
            Ok(n) => n,
            Err(error) => {
                bar.finish_and_clear();
                return Err(Failure {
                    code: 1,
                    message: format!("{error} (after purging {purged} rows, which stay purged)"),
                });
            }
        };
        purged += n;
        bar.inc(n);
        if n < batch_size as u64 {
            break;
        }
    }
    // Then the idempotency keys the purged rows no longer need.
    while !stopped && !interrupted.load(Ordering::SeqCst) {
        match outbox.store().purge_keys(retention).await {
            Ok(n) if n >= batch_size as u64 => {}
            Ok(_) => break,
            Err(error) => {
                bar.finish_and_clear();
                return Err(Failure {
                    code: 1,
                    message: format!("{error} (after purging {purged} rows, which stay purged)"),
                });
            }
        }
    }
    bar.finish_and_clear();
    output::purged(json, purged, total, stopped);
    Ok(if stopped { 130 } else { 0 })
}

impl FilterArgs {
    fn to_filter(&self) -> Result<EventFilter, Failure> {
        let mut filter = EventFilter::new();
        for id in &self.id {
            filter = filter.id(parse::uuid(id)?);
        }
        if let Some(aggregate) = &self.aggregate {
            let (ty, id) = parse::aggregate(aggregate)?;
            filter = filter.aggregate(ty, id);
        }
        if let Some(event_type) = &self.event_type {
            filter = filter.event_type(event_type);
        }
        if let Some(reason) = &self.reason {
            filter = filter.reason(reason);
        }
        if let Some(group) = &self.group {
            filter = filter.group(group);
        }
        if let Some(since) = &self.since {
            filter = filter.created_from(parse::time(since)?);
        }
        if let Some(until) = &self.until {
            filter = filter.created_until(parse::time(until)?);
        }
        Ok(filter)
    }

    /// An action must say what it acts on.
    fn to_action_filter(&self) -> Result<EventFilter, Failure> {
        let filter = self.to_filter()?;
        if filter.is_empty() {
            return Err(Failure::usage(
                "say which events: --id, --group, --type, --reason, --aggregate, --since or --until",
            ));
        }
        Ok(filter)
    }
}
