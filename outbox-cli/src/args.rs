//! The command line.

use crate::parse::Span;
use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand};

/// See and steer a transactional outbox: how far behind it is, what is dead and why, put it
/// back, clean up. Works on PostgreSQL and SQLite.
///
/// Exit codes: 0 done; 1 database error; 2 bad usage; 3 no outbox table (run `outbox
/// migrate`); 4 `check` found inconsistencies; 5 no such event; 130 `purge` interrupted.
#[derive(Debug, Parser)]
#[command(name = "outbox", version)]
pub(crate) struct Cli {
    /// Database URL: postgres://user@host/db, mysql://user@host/db (MySQL or MariaDB) or
    /// sqlite:path/to/file.db
    #[arg(
        long,
        env = "OUTBOX_DATABASE_URL",
        hide_env_values = true,
        global = true,
        default_value = "sqlite:outbox.db"
    )]
    pub url: String,
    /// The outbox table.
    #[arg(long, env = "OUTBOX_TABLE", global = true, default_value = "outbox")]
    pub table: String,
    /// Machine-readable output (JSON on stdout).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The table layout `migrate` builds: the other commands read every layout alike.
    pub fn layout(&self) -> outbox_core::TableLayout {
        match self.command {
            Command::Migrate { debezium: true, .. } => outbox_core::TableLayout::Debezium,
            Command::Migrate {
                partitions: Some(count),
                partition_every,
                ..
            } => outbox_core::TableLayout::partitioned(partition_every.0, count),
            _ => outbox_core::TableLayout::Standard,
        }
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Counts by status and event type, lag, leases, parked and stuck aggregates.
    Status {
        /// An aggregate whose oldest pending event waited longer than this is stuck.
        #[arg(long, default_value = "5m")]
        stuck_after: Span,
    },
    /// Dead events: list, show, group by cause.
    Dead {
        #[command(subcommand)]
        command: DeadCommand,
    },
    /// Put dead events back to pending (their aggregates keep their order).
    Requeue {
        #[command(flatten)]
        filter: FilterArgs,
        /// Only say how many.
        #[arg(long)]
        dry_run: bool,
    },
    /// Give up on dead events: release the aggregates parked at them and move them to
    /// `<table>_archive`.
    Discard {
        #[command(flatten)]
        filter: FilterArgs,
        /// Only say how many.
        #[arg(long)]
        dry_run: bool,
    },
    /// Deliver delivered (or archived) events again, each aggregate in order.
    Republish {
        #[command(flatten)]
        filter: FilterArgs,
        /// Only say how many.
        #[arg(long)]
        dry_run: bool,
    },
    /// Aggregates parked at a dead event.
    Parked {
        #[command(subcommand)]
        command: ParkedCommand,
    },
    /// Delete (or archive) delivered events older than a given age, in batches.
    Purge {
        /// Delivered longer ago than this: 30s, 15m, 12h, 7d, 2w.
        #[arg(long)]
        older_than: Span,
        /// Move them to `<table>_archive` instead of deleting them.
        #[arg(long)]
        archive: bool,
        /// Rows per statement.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..).map(|n| n as usize))]
        batch_size: usize,
        /// Only say how many.
        #[arg(long)]
        dry_run: bool,
    },
    /// Create or upgrade the outbox tables.
    Migrate {
        /// Also the columns Debezium's outbox event router reads, filled by a trigger
        /// (PostgreSQL; `TableLayout::Debezium`, see the README).
        #[arg(long, conflicts_with = "partitions")]
        debezium: bool,
        /// A new table partitioned into this many partitions (2 to 64) that retention
        /// truncates whole (PostgreSQL; `TableLayout::Partitioned`, see the README).
        #[arg(long)]
        partitions: Option<u16>,
        /// How long each partition takes new events, with `--partitions`.
        #[arg(long, default_value = "1h", requires = "partitions")]
        partition_every: Span,
    },
    /// Find pending events no relay would ever claim.
    Check,
}

#[derive(Debug, Subcommand)]
pub(crate) enum DeadCommand {
    /// Dead events, the most recent first.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// One event: payload, headers, reason, times.
    Show {
        /// The event id.
        id: String,
    },
    /// Dead events grouped by cause (event type and normalised reason).
    Groups {
        #[command(flatten)]
        filter: FilterArgs,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ParkedCommand {
    /// Aggregates parked at a dead event, the longest parked first.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Let parked aggregates move on: their dead event stays dead, the events behind it are
    /// delivered.
    Release {
        /// TYPE:ID of an aggregate (repeatable).
        #[arg(long)]
        aggregate: Vec<String>,
        /// Every parked aggregate.
        #[arg(long, conflicts_with = "aggregate")]
        all: bool,
        /// Only say how many.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Which events: every condition given must hold.
#[derive(Debug, Args)]
pub(crate) struct FilterArgs {
    /// This event (repeatable).
    #[arg(long)]
    pub id: Vec<String>,
    /// The dead events of one cause: a fingerprint from `outbox dead groups`.
    #[arg(long)]
    pub group: Option<String>,
    /// Events of this type.
    #[arg(long = "type")]
    pub event_type: Option<String>,
    /// Events whose last failure contains this text (case ignored).
    #[arg(long)]
    pub reason: Option<String>,
    /// The events of one aggregate, TYPE:ID.
    #[arg(long)]
    pub aggregate: Option<String>,
    /// Created at or after: an RFC 3339 time, or an age such as 2h.
    #[arg(long)]
    pub since: Option<String>,
    /// Created before: an RFC 3339 time, or an age such as 30m.
    #[arg(long)]
    pub until: Option<String>,
}
