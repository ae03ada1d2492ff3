//! What the gateway counts, and the Prometheus text it serves on
//! `metrics_listen` (plain HTTP, loopback by default; see `net.rs`).
//! Counting is a few atomic adds or a short lock on the decision path;
//! rendering reads the counters and the store, off that path.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::core::Gateway;
use crate::model;

/// How many verification latency samples the metrics keep.
pub const VERIFY_SAMPLES: usize = 4096;

/// Adds a sample to a ring of at most [`VERIFY_SAMPLES`]: constant time,
/// the oldest leaves as the newest arrives.
pub(crate) fn push_sample(ring: &mut std::collections::VecDeque<u64>, v: u64) {
    if ring.len() >= VERIFY_SAMPLES {
        ring.pop_front();
    }
    ring.push_back(v);
}

/// Counters for metrics.
#[derive(Default)]
pub struct Counters {
    /// Outcomes: ("granted" | deny name) -> count.
    pub outcomes: Mutex<HashMap<&'static str, u64>>,
    /// Verification latency samples in microseconds, the newest
    /// [`VERIFY_SAMPLES`] (a ring: the oldest leaves as one arrives).
    pub verify_us: Mutex<std::collections::VecDeque<u64>>,
    /// TLS handshakes refused.
    pub tls_rejected: std::sync::atomic::AtomicU64,
    /// Refusal audit records suppressed by the per-caller budget.
    pub audit_suppressed: std::sync::atomic::AtomicU64,
    /// Operators locked out after consecutive failures.
    pub lockouts: std::sync::atomic::AtomicU64,
    /// Failures (refused proofs, wrong PINs reported) counted by the
    /// throttle.
    pub failures: std::sync::atomic::AtomicU64,
}

/// Renders the Prometheus metrics.
pub fn render(gw: &Gateway) -> String {
    use std::fmt::Write;
    use std::sync::atomic::Ordering;
    let mut s = String::new();
    let _ = writeln!(s, "# HELP pivgate_authentications_total Completed authentications by outcome and reason.");
    let _ = writeln!(s, "# TYPE pivgate_authentications_total counter");
    if let Ok(m) = gw.counters.outcomes.lock() {
        let mut v: Vec<_> = m.iter().collect();
        v.sort();
        for (k, n) in v {
            if *k == "granted" {
                let _ = writeln!(s, "pivgate_authentications_total{{outcome=\"granted\"}} {n}");
            } else {
                let _ = writeln!(s, "pivgate_authentications_total{{outcome=\"denied\",reason=\"{k}\"}} {n}");
            }
        }
    }
    if let Ok(v) = gw.counters.verify_us.lock() {
        let mut sorted: Vec<u64> = v.iter().copied().collect();
        sorted.sort_unstable();
        let q = |p: f64| sorted.get(((sorted.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0) as f64 / 1e6;
        let _ = writeln!(s, "# HELP pivgate_verification_seconds Time to verify a proof (challenge, certificate, revocation, signature), recent samples.");
        let _ = writeln!(s, "# TYPE pivgate_verification_seconds summary");
        for p in [0.5, 0.9, 0.99] {
            let _ = writeln!(s, "pivgate_verification_seconds{{quantile=\"{p}\"}} {}", q(p));
        }
        let _ = writeln!(s, "pivgate_verification_seconds_count {}", sorted.len());
    }
    let agents = gw.presence.lock().map(|p| p.len()).unwrap_or(0);
    let _ = writeln!(s, "# TYPE pivgate_connected_agents gauge\npivgate_connected_agents {agents}");
    let _ = writeln!(s, "# TYPE pivgate_watchers gauge\npivgate_watchers {}", gw.watcher_count());
    let _ = writeln!(s, "# HELP pivgate_audit_suppressed_total Refusals past their caller's audit budget: counted and summarised, not recorded one by one.");
    let _ =
        writeln!(s, "# TYPE pivgate_audit_suppressed_total counter\npivgate_audit_suppressed_total {}", gw.counters.audit_suppressed.load(Ordering::Relaxed));
    let _ = writeln!(s, "# HELP pivgate_lockouts_total Operators locked out after consecutive failures.");
    let _ = writeln!(s, "# TYPE pivgate_lockouts_total counter\npivgate_lockouts_total {}", gw.counters.lockouts.load(Ordering::Relaxed));
    let _ = writeln!(s, "# HELP pivgate_throttled_failures_total Refused proofs and reported wrong PINs counted by the throttle.");
    let _ = writeln!(s, "# TYPE pivgate_throttled_failures_total counter\npivgate_throttled_failures_total {}", gw.counters.failures.load(Ordering::Relaxed));
    let locked_out = gw.store.lockouts().map(|l| l.len()).unwrap_or(0);
    let _ = writeln!(s, "# TYPE pivgate_operators_locked_out gauge\npivgate_operators_locked_out {locked_out}");
    let unlocked = gw.store.terminals().map(|t| t.iter().filter(|t| matches!(t.session, model::Session::Unlocked { .. })).count()).unwrap_or(0);
    let _ = writeln!(s, "# TYPE pivgate_unlocked_terminals gauge\npivgate_unlocked_terminals {unlocked}");
    let _ = writeln!(s, "# HELP pivgate_crl_refused_total CRLs refused, by reason (the CRL held before stays in force).");
    let _ = writeln!(s, "# TYPE pivgate_crl_refused_total counter");
    if let Ok(m) = gw.crl_intake.refused.lock() {
        let mut v: Vec<_> = m.iter().collect();
        v.sort();
        for (k, n) in v {
            let _ = writeln!(s, "pivgate_crl_refused_total{{reason=\"{k}\"}} {n}");
        }
    }
    let _ = writeln!(
        s,
        "# TYPE pivgate_crl_fetch_failures_total counter\npivgate_crl_fetch_failures_total {}",
        gw.crl_intake.failed_fetches.load(Ordering::Relaxed)
    );
    let _ = writeln!(s, "# TYPE pivgate_crl_accepted_total counter\npivgate_crl_accepted_total {}", gw.crl_intake.accepted.load(Ordering::Relaxed));
    let _ = writeln!(s, "# TYPE pivgate_crl_age_seconds gauge");
    for (source, age) in gw.trust.crl_ages(gw.clock.system()) {
        let _ = writeln!(s, "pivgate_crl_age_seconds{{source={source:?}}} {age}");
    }
    let _ = writeln!(
        s,
        "# TYPE pivgate_tls_handshakes_refused_total counter\npivgate_tls_handshakes_refused_total {}",
        gw.counters.tls_rejected.load(Ordering::Relaxed)
    );
    let _ = writeln!(s, "# TYPE pivgate_group_commits_total counter\npivgate_group_commits_total {}", gw.store.flushes());
    let _ = writeln!(s, "# HELP pivgate_sled_blob_files Files sled wrote under blobs/ (never fsynced); anything but 0 is an alarm.");
    let _ = writeln!(s, "# TYPE pivgate_sled_blob_files gauge\npivgate_sled_blob_files {}", gw.store.blob_files());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latency_ring_keeps_the_newest_samples() {
        let mut ring = std::collections::VecDeque::new();
        for v in 0..(VERIFY_SAMPLES as u64 + 10) {
            push_sample(&mut ring, v);
        }
        assert_eq!(ring.len(), VERIFY_SAMPLES);
        assert_eq!(ring.front(), Some(&10));
        assert_eq!(ring.back(), Some(&(VERIFY_SAMPLES as u64 + 9)));
    }
}
