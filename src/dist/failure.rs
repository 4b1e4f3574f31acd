//! Naming the rank that failed. When one rank dies or hangs, its ring neighbours fail too,
//! a moment later, and each of them sees only its own neighbour go quiet. Left alone, every
//! rank would blame whichever neighbour it happened to wait on. Instead rank 0 acts as the
//! arbiter: every failure a rank sees goes to rank 0 (as an abort notice on its rendezvous
//! connection), rank 0 gathers the evidence for a short grace period, picks the most direct
//! piece (a rank whose connection closed unannounced, then a rank whose heartbeats stopped,
//! then what the ranks reported, then its own ring errors), tells every rank, and stops.
//! The other ranks wait for that verdict a little longer than the grace period, and report
//! what they saw themselves only if it never comes (rank 0 itself being the one that died).

use std::sync::Mutex;
use std::time::Duration;

/// How directly a piece of evidence names the rank that failed; higher is more direct.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Evidence {
    /// Rank 0's own ring transfer failed (names a neighbour, which may only be a victim).
    RingError,
    /// Another rank reported a failed transfer with its neighbour.
    Report,
    /// A rank stopped sending heartbeats.
    Stalled,
    /// A rank's rendezvous connection closed without the "finished" notice: it exited.
    Gone,
}

/// How long rank 0 gathers evidence after the first failure before it gives its verdict:
/// long enough for the direct evidence of a death (its closed connection) to arrive, short
/// enough to stay well inside the job's timeout.
pub(super) fn grace(timeout: Duration) -> Duration {
    (timeout / 3).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// Everything rank 0 has seen since the first failure.
struct Case {
    best: (Evidence, String),
}

static CASE: Mutex<Option<Case>> = Mutex::new(None);

/// Records a piece of evidence at rank 0. Returns true for the first one: its caller must
/// then call [`verdict`] after the grace period.
pub(super) fn record(evidence: Evidence, msg: String) -> bool {
    let mut case = CASE.lock().unwrap_or_else(|p| p.into_inner());
    match case.as_mut() {
        None => {
            *case = Some(Case {
                best: (evidence, msg),
            });
            true
        }
        Some(c) => {
            // Strictly more direct evidence wins; among equals, the earliest.
            if evidence > c.best.0 {
                c.best = (evidence, msg);
            }
            false
        }
    }
}

/// The most direct evidence recorded so far, if any.
pub(super) fn verdict() -> Option<String> {
    let case = CASE.lock().unwrap_or_else(|p| p.into_inner());
    case.as_ref().map(|c| c.best.1.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_direct_evidence_wins_and_the_earliest_among_equals() {
        // One process-wide case: this is the only test that touches it.
        assert!(record(Evidence::RingError, "rank 2 closed".into()));
        assert!(!record(
            Evidence::Report,
            "rank 2 reports: rank 1 closed".into()
        ));
        assert_eq!(verdict().unwrap(), "rank 2 reports: rank 1 closed");
        assert!(!record(Evidence::Gone, "rank 1 exited".into()));
        assert!(!record(
            Evidence::Stalled,
            "rank 3 stopped responding".into()
        ));
        assert!(!record(Evidence::Gone, "rank 2 exited".into()));
        assert_eq!(verdict().unwrap(), "rank 1 exited");
    }

    #[test]
    fn grace_is_bounded() {
        assert_eq!(grace(Duration::from_secs(60)), Duration::from_secs(1));
        assert_eq!(grace(Duration::from_secs(3)), Duration::from_secs(1));
        assert_eq!(
            grace(Duration::from_millis(900)),
            Duration::from_millis(300)
        );
        assert_eq!(grace(Duration::from_millis(30)), Duration::from_millis(100));
    }
}
