//! Which WAL position the relay may confirm to PostgreSQL: the one rule, pure.
//!
//! The slot forgets everything before the confirmed position, so a confirm must never pass a
//! row ClickHouse has not accepted. [`Progress`] is told what the session sees (the WAL the
//! server sent, commits, rows handed to the sink, the sink accepting them) and answers, when
//! the sink holds nothing any more, with [`Settled`]: the position to confirm, if any; it never
//! goes backward.

use pgoutput::Lsn;

/// Everything received up to a transaction boundary is in ClickHouse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// The position to confirm to PostgreSQL: past the last one confirmed, or `None`.
    pub confirm: Option<Lsn>,
}

/// What the session has received, what the sink holds, and what was confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// The last position confirmed (the slot's position when the session started).
    confirmed: Lsn,
    /// Highest WAL position the server said it has sent everything up to.
    received: Lsn,
    /// Rows were handed to the sink that it has not accepted yet.
    holding: bool,
    /// End LSN of the last complete transaction among the held rows: what may be confirmed
    /// once the sink accepts them.
    held_end: Option<Lsn>,
}

impl Progress {
    /// Starts at the slot's confirmed position.
    pub fn new(confirmed: Lsn) -> Progress {
        Progress {
            confirmed,
            received: Lsn(0),
            holding: false,
            held_end: None,
        }
    }

    /// The last position confirmed.
    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    /// Highest WAL position the server said it has sent everything up to.
    pub fn received(&self) -> Lsn {
        self.received
    }

    /// Whether the sink holds rows it has not accepted yet.
    pub fn holding(&self) -> bool {
        self.holding
    }

    /// The server has sent everything up to `lsn`.
    pub fn saw_wal(&mut self, lsn: Lsn) {
        self.received = self.received.max(lsn);
    }

    /// A row was handed to the sink (written into its open insert or kept for a re-send).
    pub fn hold_row(&mut self) {
        self.holding = true;
    }

    /// End LSN of the last complete transaction among the rows the sink holds.
    pub fn held_end(&self) -> Option<Lsn> {
        self.held_end
    }

    /// A transaction ended at `end`: settled at once when the sink holds nothing (the
    /// transaction had no rows to ship), else once the sink accepts what it holds.
    pub fn commit(&mut self, end: Lsn) -> Option<Settled> {
        self.saw_wal(end);
        if self.holding {
            self.held_end = Some(end);
            None
        } else {
            Some(self.settle(end))
        }
    }

    /// A keepalive: the server has sent everything up to `wal_end`. Between transactions and
    /// with nothing held, everything received is in ClickHouse, so the slot may move on even
    /// when only other tables write WAL.
    pub fn keepalive(&mut self, wal_end: Lsn, in_transaction: bool) -> Option<Settled> {
        self.saw_wal(wal_end);
        if in_transaction || self.holding {
            None
        } else {
            Some(self.settle(self.received))
        }
    }

    /// The sink accepted every row it held: settled up to the last complete transaction among
    /// them (`None` when there was none). A caller that sends rows in the middle of a
    /// transaction does not call this: it keeps holding until that transaction's commit.
    pub fn accepted(&mut self) -> Option<Settled> {
        self.holding = false;
        self.held_end.take().map(|end| self.settle(end))
    }

    /// The one confirm rule: up to `lsn` everything is in ClickHouse; confirm it when it is
    /// past the last position confirmed, never backward.
    fn settle(&mut self, lsn: Lsn) -> Settled {
        let confirm = (lsn > self.confirmed).then_some(lsn);
        self.confirmed = self.confirmed.max(lsn);
        Settled { confirm }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn confirm(settled: Option<Settled>) -> Option<Option<Lsn>> {
        settled.map(|s| s.confirm)
    }

    #[test]
    fn a_commit_without_rows_is_confirmed_at_once() {
        let mut p = Progress::new(Lsn(100));
        assert_eq!(confirm(p.commit(Lsn(150))), Some(Some(Lsn(150))));
        assert_eq!(p.confirmed(), Lsn(150));
    }

    #[test]
    fn held_rows_are_confirmed_only_once_accepted() {
        let mut p = Progress::new(Lsn(100));
        p.hold_row();
        assert_eq!(p.commit(Lsn(150)), None);
        p.hold_row();
        assert_eq!(p.commit(Lsn(200)), None);
        assert_eq!(p.held_end(), Some(Lsn(200)));
        // A keepalive past everything does not confirm rows the sink holds.
        assert_eq!(p.keepalive(Lsn(300), false), None);
        assert_eq!(p.confirmed(), Lsn(100));
        assert_eq!(confirm(p.accepted()), Some(Some(Lsn(200))));
        // Now nothing is held: the keepalive's position may be confirmed.
        assert_eq!(confirm(p.keepalive(Lsn(300), false)), Some(Some(Lsn(300))));
    }

    #[test]
    fn rows_of_an_incomplete_transaction_confirm_nothing() {
        let mut p = Progress::new(Lsn(100));
        p.hold_row();
        assert_eq!(p.keepalive(Lsn(400), true), None);
        assert_eq!(p.accepted(), None);
        assert_eq!(p.keepalive(Lsn(400), true), None);
        assert_eq!(p.confirmed(), Lsn(100));
    }

    #[test]
    fn never_backward() {
        let mut p = Progress::new(Lsn(500));
        assert_eq!(confirm(p.commit(Lsn(300))), Some(None));
        assert_eq!(confirm(p.keepalive(Lsn(400), false)), Some(None));
        p.hold_row();
        p.commit(Lsn(450));
        assert_eq!(confirm(p.accepted()), Some(None));
        assert_eq!(p.confirmed(), Lsn(500));
        assert_eq!(p.received(), Lsn(450));
    }

    #[test]
    fn a_keepalive_inside_a_transaction_waits() {
        let mut p = Progress::new(Lsn(0));
        assert_eq!(p.keepalive(Lsn(10), true), None);
        assert_eq!(confirm(p.keepalive(Lsn(5), false)), Some(Some(Lsn(10))));
    }
}
