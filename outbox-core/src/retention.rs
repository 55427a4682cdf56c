use std::time::Duration;

/// What to do with delivered rows: delete (or archive into `<table>_archive`) those delivered
/// longer ago than `keep`, in batches that each lock only their own rows briefly.
///
/// Run it by hand with [`Outbox::purge`](crate::Outbox::purge), or on a schedule with
/// [`RelayBuilder::retention`](crate::RelayBuilder::retention). Pending and dead rows are never
/// touched.
///
/// ```
/// use outbox_core::Retention;
/// use std::time::Duration;
/// let keep_a_day = Retention::delete_after(Duration::from_secs(24 * 3600)).batch_size(5_000);
/// let archive = Retention::archive_after(Duration::from_secs(3600));
/// ```
#[derive(Debug, Clone)]
pub struct Retention {
    pub(crate) keep: Duration,
    pub(crate) batch_size: usize,
    pub(crate) archive: bool,
}

impl Retention {
    /// Delete delivered rows older than `keep`.
    pub fn delete_after(keep: Duration) -> Self {
        Self {
            keep,
            batch_size: 1_000,
            archive: false,
        }
    }

    /// Move delivered rows older than `keep` into `<table>_archive`.
    pub fn archive_after(keep: Duration) -> Self {
        Self {
            archive: true,
            ..Self::delete_after(keep)
        }
    }

    /// Rows per statement (default 1,000): smaller batches hold locks for less time.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }
}
