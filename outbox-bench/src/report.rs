//! The figures of a run, as Markdown tables, JSON and SVG plots.

use crate::{sys, BoxError, Config, Target};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::Path;

/// One raw PostgreSQL claim-and-mark measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RawPg {
    pub statement: String,
    pub clients: usize,
    pub rows: usize,
    pub rows_per_s: f64,
    pub pg_cpu_us_per_row: f64,
    pub wal_bytes_per_row: f64,
}

/// One raw broker publish measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RawBroker {
    pub target: Target,
    pub messages: usize,
    pub in_flight: usize,
    pub msgs_per_s: f64,
}

/// One enqueue-overhead measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnqueueFigure {
    pub writers: usize,
    pub mode: String,
    pub transactions: usize,
    pub tx_per_s: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Mean latency minus the plain transaction's mean latency.
    pub overhead_ms: f64,
}

/// One backlog drained by some relays.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayFigure {
    pub target: Target,
    pub backlog: usize,
    /// Aggregates the backlog is spread over.
    #[serde(default)]
    pub aggregates: usize,
    /// Events per aggregate per claim.
    #[serde(default)]
    pub run_length: usize,
    pub relays: usize,
    pub workers: usize,
    pub batch: usize,
    pub seconds: f64,
    pub events_per_s: f64,
    /// min(raw PostgreSQL claim-and-mark with as many clients as relays, raw broker rate).
    pub raw_limit: f64,
    pub limited_by: String,
    pub ratio: f64,
    pub pg_cpu_us_per_event: f64,
    /// PostgreSQL CPU time per second of the run: how many cores it kept busy.
    pub pg_cores: f64,
    pub wal_bytes_per_event: f64,
    /// CPU of the whole benchmark process (relays, destinations' clients, handlers).
    pub relay_cpu_us_per_event: f64,
    pub peak_rss_mb: f64,
    pub duplicates: usize,
    /// Handler runs only: events seen out of sequence or twice.
    pub order_violations: Option<u64>,
    /// `--hold-open` runs (both of each pair): dead tuples and bytes of the outbox's tables
    /// at the drain's end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bloat: Option<Bloat>,
    /// Whether a snapshot was held open elsewhere during the drain.
    #[serde(default)]
    pub held_open: bool,
    /// The table layout: `standard` or `partitioned`.
    #[serde(default)]
    pub layout: String,
    /// `--hold-open` runs: retention (`delete_after(0)`) right after the drain, the snapshot
    /// still held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionFigure>,
}

/// One retention pass after a `--hold-open` drain.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RetentionFigure {
    pub seconds: f64,
    pub removed: u64,
    /// The tables after it.
    pub bloat: Bloat,
}

/// What a drain left in the outbox's tables while a snapshot was held open elsewhere.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Bloat {
    /// Per table (`<table>`, `_cursors`, `_new`, `_aggregates`): dead tuples, live tuples and
    /// total bytes (with indexes), from `pgstattuple` where installed, else the statistics.
    pub tables: Vec<(String, u64, u64, u64)>,
}

/// Commit-to-confirmation latency at one offered rate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LatencyFigure {
    pub target: Target,
    pub offered_per_s: u32,
    pub achieved_per_s: f64,
    pub samples: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub duplicates: usize,
    /// The 0th, 0.5th, …, 100th percentiles, for the plot.
    pub distribution_ms: Vec<f64>,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub machine: String,
    pub versions: Vec<(String, String)>,
    pub aggregates: usize,
    pub payload_bytes: usize,
    pub raw_pg: Vec<RawPg>,
    pub raw_brokers: Vec<RawBroker>,
    pub enqueue: Vec<EnqueueFigure>,
    pub relay: Vec<RelayFigure>,
    /// Hot-aggregate drains: one relay, few aggregates with deep backlogs.
    #[serde(default)]
    pub hot: Vec<RelayFigure>,
    pub latency: Vec<LatencyFigure>,
}

impl Report {
    pub(crate) fn new(config: &Config) -> Self {
        Self {
            machine: sys::machine(),
            versions: Vec::new(),
            aggregates: config.aggregates,
            payload_bytes: config.payload_bytes,
            raw_pg: Vec::new(),
            raw_brokers: Vec::new(),
            enqueue: Vec::new(),
            relay: Vec::new(),
            hot: Vec::new(),
            latency: Vec::new(),
        }
    }

    /// The best raw claim-and-mark rate with `clients` clients.
    pub fn raw_pg_rate(&self, clients: usize) -> Option<&RawPg> {
        self.raw_pg
            .iter()
            .filter(|r| r.clients == clients)
            .max_by(|a, b| a.rows_per_s.total_cmp(&b.rows_per_s))
    }

    /// The raw publish rate of a broker.
    pub fn raw_broker_rate(&self, target: Target) -> Option<f64> {
        self.raw_brokers
            .iter()
            .find(|r| r.target == target)
            .map(|r| r.msgs_per_s)
    }

    /// Sets the raw limit and ratio of a relay figure.
    pub(crate) fn rate_relay(&self, figure: &mut RelayFigure) {
        let mut limits = Vec::new();
        if let Some(pg) = self.raw_pg_rate(figure.relays) {
            limits.push((pg.rows_per_s, format!("PostgreSQL ({})", pg.statement)));
        }
        if let Some(broker) = self.raw_broker_rate(figure.target) {
            limits.push((broker, format!("{} publish", figure.target.name())));
        }
        if let Some((limit, by)) = limits.into_iter().min_by(|a, b| a.0.total_cmp(&b.0)) {
            figure.raw_limit = limit;
            figure.limited_by = by;
            figure.ratio = figure.events_per_s / limit;
        }
    }

    /// The tables of the report, in Markdown.
    pub fn to_markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "Machine: {}  ", self.machine);
        let versions: Vec<String> = self
            .versions
            .iter()
            .map(|(name, v)| format!("{name} {v}"))
            .collect();
        let _ = writeln!(md, "Servers: {}  ", versions.join(", "));
        let _ = writeln!(
            md,
            "Events: {} bytes of JSON, {} aggregates\n",
            self.payload_bytes, self.aggregates
        );

        md.push_str("### Raw limits\n\n");
        md.push_str(
            "| what | clients / in flight | rate | PostgreSQL CPU per row | WAL per row |\n",
        );
        md.push_str("|---|---:|---:|---:|---:|\n");
        for r in &self.raw_pg {
            let _ = writeln!(
                md,
                "| PostgreSQL claim-and-mark, {} (500 rows) | {} | {:.0} rows/s | {:.1} µs | {:.0} B |",
                r.statement, r.clients, r.rows_per_s, r.pg_cpu_us_per_row, r.wal_bytes_per_row
            );
        }
        for r in &self.raw_brokers {
            let _ = writeln!(
                md,
                "| {} publish with confirmation | {} | {:.0} msgs/s | | |",
                r.target.name(),
                r.in_flight,
                r.msgs_per_s
            );
        }

        md.push_str("\n### Enqueue overhead\n\n");
        md.push_str("| writers | transaction | tx/s | mean | p50 | p99 | added by enqueue |\n");
        md.push_str("|---:|---|---:|---:|---:|---:|---:|\n");
        for e in &self.enqueue {
            let added = if e.mode.contains("enqueue") {
                format!("{:+.3} ms", e.overhead_ms)
            } else {
                "—".to_owned()
            };
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.3} ms | {:.3} ms | {:.3} ms | {added} |",
                e.writers, e.mode, e.tx_per_s, e.mean_ms, e.p50_ms, e.p99_ms
            );
        }

        md.push_str("\n### Relay throughput\n\n");
        md.push_str(
            "| destination | backlog | relays × workers × batch | events/s | raw limit | ratio | \
             PostgreSQL CPU per event | PostgreSQL cores busy | WAL per event | bench CPU per event | peak RSS | duplicates | order violations |\n",
        );
        md.push_str("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for r in &self.relay {
            let _ = writeln!(
                md,
                "| {}{} | {} | {} × {} × {} | **{:.0}** | {:.0} ({}) | **{:.0} %** | {:.0} µs | {:.2} | {:.0} B | {:.0} µs | {:.1} MB | {} | {} |",
                r.target.name(),
                if r.held_open { ", snapshot held open" } else { "" },
                r.backlog,
                r.relays,
                r.workers,
                r.batch,
                r.events_per_s,
                r.raw_limit,
                r.limited_by,
                r.ratio * 100.0,
                r.pg_cpu_us_per_event,
                r.pg_cores,
                r.wal_bytes_per_event,
                r.relay_cpu_us_per_event,
                r.peak_rss_mb,
                r.duplicates,
                r.order_violations.map_or("—".to_owned(), |v| v.to_string())
            );
        }

        if self.relay.iter().any(|r| r.bloat.is_some()) {
            md.push_str("\n### Tables after each drain (`--hold-open`)\n\n");
            md.push_str(
                "| destination | layout | snapshot held open | table | dead tuples | live tuples | size | after retention: dead | live | size |\n",
            );
            md.push_str("|---|---|---|---|---:|---:|---:|---:|---:|---:|\n");
            for r in &self.relay {
                let after = r.retention.as_ref().map(|f| &f.bloat.tables);
                for (i, (table, dead, live, bytes)) in
                    r.bloat.iter().flat_map(|b| &b.tables).enumerate()
                {
                    let after = after.and_then(|a| a.get(i)).map_or_else(
                        || "— | — | —".to_owned(),
                        |(_, dead, live, bytes)| {
                            format!("{dead} | {live} | {:.1} MB", *bytes as f64 / 1e6)
                        },
                    );
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | `{table}` | {dead} | {live} | {:.1} MB | {after} |",
                        r.target.name(),
                        r.layout,
                        if r.held_open { "yes" } else { "no" },
                        *bytes as f64 / 1e6
                    );
                }
            }
            md.push_str(
                "\n| destination | layout | snapshot held open | retention removed | in |\n",
            );
            md.push_str("|---|---|---|---:|---:|\n");
            for r in &self.relay {
                if let Some(f) = &r.retention {
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | {} | {:.2} s |",
                        r.target.name(),
                        r.layout,
                        if r.held_open { "yes" } else { "no" },
                        f.removed,
                        f.seconds
                    );
                }
            }
        }

        md.push_str("\n### Hot aggregates (one relay, the backlog spread over few aggregates)\n\n");
        md.push_str(
            "| destination | aggregates | backlog | batch × run length | events/s | raw limit | ratio | \
             PostgreSQL CPU per event | WAL per event | duplicates | order violations |\n",
        );
        md.push_str("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n");
        for r in &self.hot {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} × {} | **{:.0}** | {:.0} ({}) | **{:.0} %** | {:.0} µs | {:.0} B | {} | {} |",
                r.target.name(),
                r.aggregates,
                r.backlog,
                r.batch,
                r.run_length,
                r.events_per_s,
                r.raw_limit,
                r.limited_by,
                r.ratio * 100.0,
                r.pg_cpu_us_per_event,
                r.wal_bytes_per_event,
                r.duplicates,
                r.order_violations.map_or("—".to_owned(), |v| v.to_string())
            );
        }

        md.push_str("\n### Latency, commit → confirmation (one relay, open loop)\n\n");
        md.push_str("| destination | offered | achieved | samples | p50 | p90 | p99 | max |\n");
        md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
        for l in &self.latency {
            let _ = writeln!(
                md,
                "| {} | {}/s | {:.0}/s | {} | **{:.2} ms** | {:.2} ms | **{:.2} ms** | {:.2} ms |",
                l.target.name(),
                l.offered_per_s,
                l.achieved_per_s,
                l.samples,
                l.p50_ms,
                l.p90_ms,
                l.p99_ms,
                l.max_ms
            );
        }
        md
    }

    /// Writes `results.json`, `results.md`, `throughput.svg` and `latency.svg` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), BoxError> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            dir.join("results.json"),
            serde_json::to_string_pretty(self)?,
        )?;
        self.render(dir)
    }

    /// Reads the `results.json` of an earlier run.
    pub fn read(dir: &Path) -> Result<Self, BoxError> {
        Ok(serde_json::from_str(&std::fs::read_to_string(
            dir.join("results.json"),
        )?)?)
    }

    /// Writes `results.md` and the plots into `dir`.
    pub fn render(&self, dir: &Path) -> Result<(), BoxError> {
        std::fs::write(dir.join("results.md"), self.to_markdown())?;
        self.plot_throughput(&dir.join("throughput.svg"))?;
        self.plot_latency(&dir.join("latency.svg"))?;
        Ok(())
    }

    /// Events per second against relay count, one line per destination and backlog, with the
    /// raw PostgreSQL limit for reference.
    fn plot_throughput(&self, path: &Path) -> Result<(), BoxError> {
        let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
        root.fill(&WHITE)?;
        let max_relays = self
            .relay
            .iter()
            .map(|r| r.relays)
            .max()
            .unwrap_or(1)
            .max(2);
        let rates = || {
            self.relay
                .iter()
                .map(|r| r.events_per_s)
                .chain(self.raw_pg.iter().map(|r| r.rows_per_s))
                .chain(self.raw_brokers.iter().map(|r| r.msgs_per_s))
        };
        // A log scale: the raw limits and the relay's rates differ by up to an order of magnitude.
        let top = rates().fold(1.0, f64::max) * 1.5;
        let bottom = rates().fold(f64::MAX, f64::min).min(top / 10.0) / 1.5;
        let mut chart = ChartBuilder::on(&root)
            .caption("Relay throughput vs relays (events/s)", ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.5f64..(max_relays as f64 + 0.5), (bottom..top).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("relays")
            .y_desc("events per second (log scale)")
            .x_labels(max_relays + 1)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{:.0}k", y / 1000.0))
            .draw()?;
        let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
        let mut backlogs: Vec<usize> = self.relay.iter().map(|r| r.backlog).collect();
        backlogs.sort_unstable();
        backlogs.dedup();
        for (t, target) in Target::ALL.into_iter().enumerate() {
            for (b, &backlog) in backlogs.iter().enumerate() {
                let mut points: Vec<(f64, f64)> = self
                    .relay
                    .iter()
                    .filter(|r| r.target == target && r.backlog == backlog && !r.held_open)
                    .map(|r| (r.relays as f64, r.events_per_s))
                    .collect();
                if points.is_empty() {
                    continue;
                }
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                let color = colors[t % colors.len()];
                let style = if b == 0 {
                    color.stroke_width(2)
                } else {
                    color.mix(0.5).stroke_width(2)
                };
                chart
                    .draw_series(LineSeries::new(points.clone(), style))?
                    .label(format!("{} ({backlog} backlog)", target.name()))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
                chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
            }
        }
        let mut raw: Vec<(f64, f64)> = self
            .relay
            .iter()
            .map(|r| r.relays)
            .filter_map(|n| self.raw_pg_rate(n).map(|p| (n as f64, p.rows_per_s)))
            .collect();
        raw.sort_by(|a, b| a.0.total_cmp(&b.0));
        raw.dedup();
        if !raw.is_empty() {
            let style = BLACK.mix(0.6).stroke_width(1);
            chart
                .draw_series(LineSeries::new(raw, style))?
                .label("raw PostgreSQL claim-and-mark (best statement)")
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
        // Each broker's raw publish rate, as a thin line in its colour.
        for broker in &self.raw_brokers {
            let t = Target::ALL
                .iter()
                .position(|&t| t == broker.target)
                .unwrap_or(0);
            let style = colors[t % colors.len()].mix(0.35).stroke_width(1);
            let line = vec![
                (0.5, broker.msgs_per_s),
                (max_relays as f64 + 0.5, broker.msgs_per_s),
            ];
            chart
                .draw_series(LineSeries::new(line, style))?
                .label(format!("raw {} publish", broker.target.name()))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    }

    /// The latency distribution (percentile against milliseconds) of each destination at each
    /// offered rate.
    fn plot_latency(&self, path: &Path) -> Result<(), BoxError> {
        let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
        root.fill(&WHITE)?;
        // A log scale: medians of a millisecond and tails of hundreds.
        let right = self.latency.iter().map(|l| l.max_ms).fold(1.0, f64::max) * 1.2;
        let left = 0.1;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "Commit → broker confirmation latency (share of events at or below)",
                ("sans-serif", 22),
            )
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((left..right).log_scale(), 0f64..100f64)?;
        chart
            .configure_mesh()
            .x_desc("milliseconds (log scale)")
            .y_desc("percentile")
            .draw()?;
        let colors = [BLUE, RED, GREEN, MAGENTA];
        let mut rates: Vec<u32> = self.latency.iter().map(|l| l.offered_per_s).collect();
        rates.sort_unstable();
        rates.dedup();
        for l in &self.latency {
            let t = Target::ALL.iter().position(|&t| t == l.target).unwrap_or(0);
            let color = colors[t % colors.len()];
            let style = if rates.first() == Some(&l.offered_per_s) {
                color.stroke_width(2)
            } else {
                color.mix(0.45).stroke_width(2)
            };
            let n = l.distribution_ms.len().max(2) - 1;
            let points = l
                .distribution_ms
                .iter()
                .enumerate()
                .map(|(i, &ms)| (ms.clamp(left, right), i as f64 * 100.0 / n as f64));
            chart
                .draw_series(LineSeries::new(points, style))?
                .label(format!("{} at {}/s", l.target.name(), l.offered_per_s))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    }
}
