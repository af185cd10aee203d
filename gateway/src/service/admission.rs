//! Who may connect and how often: the handshake limits per source, the accounting of failed
//! authentications, the rate limit of requests per host, and the counting of Lists, each
//! recorded in the audit trail without letting a flood flood it.

use super::*;

impl Service {
    /// Records a failed authentication (a refused handshake or a certificate with no identity).
    /// Anyone on the network can fail a handshake, as often as they like: the first failure
    /// from an address for a reason in an interval is logged and recorded, the others of the
    /// interval are counted into one record at its end ([`Tally`]).
    pub fn auth_failure(&self, peer: SocketAddr, reason: &str) {
        self.metrics.request("auth-failure");
        let earlier = match self
            .auth_failures
            .event(&(peer.ip(), reason.to_owned()), peer)
        {
            TallyVerdict::Counted => return,
            TallyVerdict::Record(earlier) => earlier,
        };
        if let Some(earlier) = earlier {
            self.record_auth_failures(&earlier);
        }
        warn!(%peer, "authentication failed: {reason}");
        let mut event = AuditEvent::new(now_ms(), AuditKind::AuthFailure);
        event.outcome = Some(Outcome::Error);
        event.peer = Some(peer);
        event.reason = Some(reason.to_owned());
        self.record(event);
    }

    pub(super) fn record_auth_failures(&self, counted: &Counted<(IpAddr, String), SocketAddr>) {
        let (address, reason) = &counted.key;
        let window = humantime::format_duration(self.auth_failures.window());
        let text = format!(
            "{} more failed authentications from {address} within {window} of the one recorded: {reason}",
            counted.more
        );
        warn!(peer = %address, count = counted.more, "{text}");
        let mut event = AuditEvent::new(now_ms(), AuditKind::AuthFailure);
        event.outcome = Some(Outcome::Error);
        event.peer = Some(counted.first);
        event.reason = Some(text);
        self.record(event);
    }

    pub(super) fn record_refused_handshakes(&self, peer: SocketAddr, more: Option<u64>) {
        let limits = &self.config.limits;
        let text = match more {
            None => format!(
                "handshake refused: more than {} per second (burst {}) from this address",
                limits.handshakes_per_source_per_second, limits.handshake_burst_per_source
            ),
            Some(more) => format!(
                "{more} more handshakes refused from {} within {} of the one recorded",
                peer.ip(),
                humantime::format_duration(self.refused_handshakes.window())
            ),
        };
        warn!(%peer, "{text}");
        let mut event = AuditEvent::new(now_ms(), AuditKind::AuthFailure);
        event.outcome = Some(Outcome::Denied);
        event.peer = Some(peer);
        event.reason = Some(text);
        self.record(event);
    }

    pub(super) fn record_lists(&self, counted: &Counted<String, SocketAddr>) {
        let mut event = AuditEvent::new(now_ms(), AuditKind::Request);
        event.identity = Some(counted.key.clone());
        event.peer = Some(counted.first);
        event.reason = Some(format!(
            "list: {} more within {} of the one recorded",
            counted.more,
            humantime::format_duration(self.lists.window())
        ));
        self.record(event);
    }

    /// Decides, before any TLS work, what becomes of a connection attempt from `remote`: while
    /// more than `retry_above_handshakes` handshakes are in progress, a source that has not
    /// proved its address gets a Retry (spoofed sources never come back); then each source may
    /// start a bounded number of handshakes per second, and is refused beyond.
    pub fn admit_handshake(
        &self,
        remote: SocketAddr,
        validated: bool,
        in_progress: usize,
    ) -> Admission {
        if !validated && in_progress >= self.config.limits.retry_above_handshakes as usize {
            self.metrics.request("handshake-retry");
            return Admission::Retry;
        }
        if self.handshake_limiter.check_key(&remote.ip()).is_ok() {
            return Admission::Accept;
        }
        self.metrics.request("handshake-refused");
        match self.refused_handshakes.event(&remote.ip(), remote) {
            TallyVerdict::Counted => {}
            TallyVerdict::Record(earlier) => {
                if let Some(earlier) = earlier {
                    self.record_refused_handshakes(earlier.first, Some(earlier.more));
                }
                self.record_refused_handshakes(remote, None);
            }
        }
        Admission::Refuse
    }

    /// Writes the counts of the intervals that ended and forgets idle sources, every interval,
    /// as long as the service lives.
    pub(super) async fn run_tallies(service: std::sync::Weak<Service>) {
        let Some(interval) = service
            .upgrade()
            .map(|s| s.config.limits.audit_count_interval)
        else {
            return;
        };
        loop {
            tokio::time::sleep(interval).await;
            let Some(service) = service.upgrade() else {
                return;
            };
            service.flush_tallies();
        }
    }

    pub(super) fn flush_tallies(&self) {
        let (failures, failures_beyond) = self.auth_failures.ended();
        for counted in &failures {
            self.record_auth_failures(counted);
        }
        let (refused, refused_beyond) = self.refused_handshakes.ended();
        for counted in &refused {
            self.record_refused_handshakes(counted.first, Some(counted.more));
        }
        let (lists, _) = self.lists.ended();
        for counted in &lists {
            self.record_lists(counted);
        }
        let beyond = failures_beyond + refused_beyond;
        if beyond > 0 {
            // Too many sources at once to count each: one line and one record for all of them.
            let text = format!(
                "{beyond} failed or refused handshakes from sources beyond the {} counted one by one",
                crate::tally::MAX_KEYS
            );
            warn!("{text}");
            let mut event = AuditEvent::new(now_ms(), AuditKind::AuthFailure);
            event.outcome = Some(Outcome::Error);
            event.reason = Some(text);
            self.record(event);
        }
        self.handshake_limiter.retain_recent();
    }

    /// A rate-limited request. The audit trail gets one record per identity per second of
    /// refusals, not one per refused request, so that a flood cannot flood the trail.
    pub(super) fn refuse_rate_limited(
        &self,
        session: &Session,
        identity: &str,
        bytes: &[u8],
        retry_after: u32,
    ) -> Message {
        self.metrics.request(ResultCode::RateLimited.name());
        if !self.rate_limit_audited.contains_key(identity) {
            self.rate_limit_audited.insert(identity.to_owned(), ());
            let mut event = AuditEvent::new(now_ms(), AuditKind::Decision);
            event.outcome = Some(Outcome::Denied);
            event.identity = session.peer.as_ref().map(|p| p.identity.clone());
            event.peer = Some(session.remote);
            event.code = Some(ResultCode::RateLimited);
            event.reason =
                Some("rate limited (further refusals within a second are not recorded)".into());
            self.record(event);
        }
        let mut d = denied(
            codec::peek_request_id(bytes),
            ResultCode::RateLimited,
            "too many requests from this host",
        );
        d.retry_after = Some(retry_after);
        Message::Denied(d)
    }

    /// The limiter is keyed by `String`: taking the key as one spares a copy per request.
    pub(super) fn rate_limited(&self, identity: &String) -> Option<u32> {
        // Checked under the read lock rather than with a copy of the `Arc`: its count is one
        // cache line that every worker would write for every request.
        let checked = self
            .limiter
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .check_key(identity);
        match checked {
            Ok(()) => None,
            Err(not_until) => {
                let wait = not_until.wait_time_from(governor::clock::Clock::now(
                    &governor::clock::DefaultClock::default(),
                ));
                Some(u32::try_from(wait.as_secs()).unwrap_or(u32::MAX).max(1))
            }
        }
    }

    /// A List changes nothing: the first of a host's in an interval is recorded, the rest
    /// counted into one record at its end, so that Lists cannot flood the trail.
    pub(super) fn record_list(&self, identity: &str, remote: SocketAddr) {
        if let TallyVerdict::Record(earlier) = self.lists.event(&identity.to_owned(), remote) {
            if let Some(earlier) = earlier {
                self.record_lists(&earlier);
            }
            let mut event = AuditEvent::new(now_ms(), AuditKind::Request);
            event.identity = Some(identity.to_owned());
            event.peer = Some(remote);
            event.reason = Some("list".into());
            self.record(event);
        }
    }
}
