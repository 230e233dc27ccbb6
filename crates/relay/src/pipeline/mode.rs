//! How the relay ships rows: streamed into one insert per batch, or, after a failed insert, re-sent
//! in small inserts so that one row ClickHouse refuses cannot hold back the rest. The mode
//! outlives a session: the [`Relay`](super::Relay) owns it and lends it to each session.

use pgoutput::Lsn;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Each batch's rows are written into one open insert as they are decoded.
    #[default]
    Streaming,
    /// The rows of the transactions committed up to `until` go in small all-or-nothing inserts,
    /// split in halves on refusal (see [`resend`](crate::sink::resend)); after them, streaming again.
    Resending { until: Lsn },
}

impl Mode {
    /// After an insert failed: the transactions committed up to `lsn` (at least) are re-sent.
    pub fn resend_through(&mut self, lsn: Option<Lsn>) {
        let until = match *self {
            Mode::Streaming => lsn,
            Mode::Resending { until } => Some(lsn.map_or(until, |lsn| lsn.max(until))),
        };
        if let Some(until) = until {
            *self = Mode::Resending { until };
        }
    }

    pub fn is_resending(self) -> bool {
        matches!(self, Mode::Resending { .. })
    }

    /// Whether a transaction committed at `commit_lsn` comes after the rows to re-send.
    pub fn ends_before(self, commit_lsn: Lsn) -> bool {
        matches!(self, Mode::Resending { until } if commit_lsn > until)
    }

    /// Whether the transaction committed at `commit_lsn` is the last one to re-send.
    pub fn last_to_resend(self, commit_lsn: Lsn) -> bool {
        matches!(self, Mode::Resending { until } if commit_lsn >= until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resend_only_widens() {
        let mut mode = Mode::Streaming;
        mode.resend_through(None);
        assert_eq!(mode, Mode::Streaming);
        mode.resend_through(Some(Lsn(200)));
        mode.resend_through(Some(Lsn(100)));
        mode.resend_through(None);
        assert_eq!(mode, Mode::Resending { until: Lsn(200) });
        assert!(!mode.ends_before(Lsn(200)) && mode.ends_before(Lsn(201)));
        assert!(mode.last_to_resend(Lsn(200)) && !mode.last_to_resend(Lsn(199)));
        assert!(!Mode::Streaming.ends_before(Lsn(1)));
    }
}
