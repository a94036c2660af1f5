//! Where the driver's signals come from: the process's SIGINT and SIGTERM, or a channel a
//! caller feeds (a test, or a driver that runs where signals mean something else).

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;

pub enum Signals {
    Os {
        int: Signal,
        term: Signal,
    },
    /// Signal numbers sent by the caller; none arrive once every sender is gone.
    Channel(mpsc::UnboundedReceiver<i32>),
}

impl Signals {
    /// SIGINT and SIGTERM of this process, from now on.
    pub fn os() -> std::io::Result<Self> {
        Ok(Self::Os {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        })
    }

    /// Signals sent through the returned sender.
    pub fn channel() -> (mpsc::UnboundedSender<i32>, Self) {
        let (tx, rx) = mpsc::unbounded_channel();
        (tx, Self::Channel(rx))
    }

    /// The next signal; pending forever when none can come.
    pub async fn recv(&mut self) -> i32 {
        let got = match self {
            Self::Os { int, term } => tokio::select! {
                s = int.recv() => s.map(|()| libc::SIGINT),
                s = term.recv() => s.map(|()| libc::SIGTERM),
            },
            Self::Channel(rx) => rx.recv().await,
        };
        match got {
            Some(sig) => sig,
            None => std::future::pending().await,
        }
    }

    /// The signals that came and were not received yet, without waiting: at most one of
    /// each kind (the kernel merges repeats of a pending signal).
    pub fn pending(&mut self) -> Vec<i32> {
        match self {
            Self::Os { int, term } => [(int, libc::SIGINT), (term, libc::SIGTERM)]
                .into_iter()
                .filter_map(|(s, n)| {
                    futures::FutureExt::now_or_never(s.recv())
                        .flatten()
                        .map(|()| n)
                })
                .collect(),
            Self::Channel(rx) => std::iter::from_fn(|| rx.try_recv().ok()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_channel_delivers_what_is_sent_and_then_nothing() {
        let (tx, mut s) = Signals::channel();
        assert!(s.pending().is_empty());
        tx.send(libc::SIGINT).unwrap();
        tx.send(libc::SIGTERM).unwrap();
        assert_eq!(s.pending(), vec![libc::SIGINT, libc::SIGTERM]);
        tx.send(libc::SIGINT).unwrap();
        assert_eq!(s.recv().await, libc::SIGINT);
        drop(tx);
        let more = tokio::time::timeout(std::time::Duration::from_millis(20), s.recv()).await;
        assert!(more.is_err(), "nothing after the sender is gone");
    }
}
