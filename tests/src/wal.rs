//! Fixtures of the log-tailing relay's tests: a relay in a task of its own, and destinations
//! that record what they are given (and hold their answer, for the tests of confirmation).

use outbox::wal::WalRelayBuilder;
use outbox::{DeliveryResult, Destination, Envelope};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A relay running in a task of its own.
#[derive(Debug)]
pub struct Running {
    stop: CancellationToken,
    task: JoinHandle<outbox::Result<()>>,
}

impl Running {
    pub fn start<D: Destination>(builder: WalRelayBuilder<D>) -> Self {
        let relay = builder.build().unwrap();
        let stop = CancellationToken::new();
        let token = stop.clone();
        Self {
            stop,
            task: tokio::spawn(async move { relay.run(token).await }),
        }
    }

    /// A graceful stop; panics if the relay takes longer than `within` to return.
    pub async fn stop_within(mut self, within: Duration) {
        self.stop.cancel();
        match tokio::time::timeout(within, &mut self.task).await {
            Ok(result) => result.unwrap().unwrap(),
            Err(_) => {
                self.task.abort();
                panic!("WalRelay::run did not return within {within:?} after shutdown");
            }
        }
    }

    /// Whether `run` returned (it should not, short of shutdown).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    pub async fn stop(self) {
        self.stop_within(Duration::from_secs(60)).await;
    }

    /// Kills the relay as a crash would: no graceful stop, no final confirmation.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// A destination that records every event it is given and confirms it.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    pub seen: Arc<Mutex<Vec<Envelope>>>,
}

impl Recorder {
    pub fn len(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn snapshot(&self) -> Vec<Envelope> {
        self.seen.lock().unwrap().clone()
    }
}

impl Destination for Recorder {
    async fn deliver(&self, batch: &[Envelope]) -> Vec<DeliveryResult> {
        self.seen.lock().unwrap().extend_from_slice(batch);
        batch.iter().map(|_| Ok(())).collect()
    }
}

/// A destination that records what it is given and holds its answer until the gate opens.
#[derive(Debug, Clone)]
pub struct Gated {
    open: watch::Receiver<bool>,
    pub seen: Arc<Mutex<Vec<Envelope>>>,
}

impl Destination for Gated {
    async fn deliver(&self, batch: &[Envelope]) -> Vec<DeliveryResult> {
        self.seen.lock().unwrap().extend_from_slice(batch);
        let mut open = self.open.clone();
        let _ = open.wait_for(|o| *o).await;
        batch.iter().map(|_| Ok(())).collect()
    }
}

pub fn gated(open: bool) -> (Gated, watch::Sender<bool>) {
    let (tx, rx) = watch::channel(open);
    (
        Gated {
            open: rx,
            seen: Arc::default(),
        },
        tx,
    )
}
