//! The one re-send: rows held in memory go to the sink in all-or-nothing inserts, and a row the
//! sink refuses is singled out by bisection. The live path (after a failed insert), replay and
//! the dead-letter retry all send through it.

use std::collections::VecDeque;
use std::ops::Range;

use super::{Failure, OwnedEventRow, Sink, SinkError};

/// A re-send of rows held in memory: [`Resend::next_refused`] sends them in order, all in one
/// insert first; an insert the sink refuses as data ([`Failure::Refused`]) is split
/// in halves until the refused row is alone, and that row is handed back (for the caller to
/// keep as a dead letter) before the rest goes on.
#[derive(Debug)]
pub struct Resend<'r> {
    rows: &'r [OwnedEventRow],
    pending: VecDeque<Range<usize>>,
    /// Rows the sink accepted so far.
    pub shipped: u64,
    /// Rows the sink refused so far.
    pub refused: u64,
}

impl<'r> Resend<'r> {
    pub fn new(rows: &'r [OwnedEventRow]) -> Resend<'r> {
        Resend {
            rows,
            pending: std::iter::once(0..rows.len()).collect(),
            shipped: 0,
            refused: 0,
        }
    }

    /// Sends until the sink refuses a row on its own: that row and why; `None` once every row
    /// is accepted or handed back. `token` names each insert for deduplication (a repeat of the
    /// same insert is dropped), or gives `None`. Any other error stops the re-send: what was
    /// accepted stays accepted.
    pub async fn next_refused<S: Sink>(
        &mut self,
        sink: &S,
        token: impl Fn(&[OwnedEventRow]) -> Option<String>,
    ) -> Result<Option<(&'r OwnedEventRow, SinkError)>, SinkError> {
        while let Some(range) = self.pending.pop_front() {
            if range.is_empty() {
                continue;
            }
            let part = &self.rows[range.clone()];
            match sink.insert_rows(part, token(part).as_deref()).await {
                Ok(()) => self.shipped += part.len() as u64,
                Err(e) if e.failure() == Failure::Refused && part.len() == 1 => {
                    self.refused += 1;
                    return Ok(Some((&part[0], e)));
                }
                Err(e) if e.failure() == Failure::Refused => {
                    let mid = range.start + range.len() / 2;
                    self.pending.push_front(mid..range.end);
                    self.pending.push_front(range.start..mid);
                }
                Err(e) => {
                    self.pending.push_front(range);
                    return Err(e);
                }
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::super::memory::MemorySink;
    use super::*;

    fn row(n: u8) -> OwnedEventRow {
        OwnedEventRow {
            event_id: [n; 16],
            event_type: b"t".to_vec(),
            event_date_time_us: 0,
            environment: Vec::new(),
            event_context: b"{}".to_vec(),
            metadata_version: 1,
            commit_lsn: 1,
            tx_seq: u32::from(n),
            xid: 0,
            sentry_trace: None,
        }
    }

    #[tokio::test]
    async fn a_refused_row_is_singled_out_and_the_rest_ships() {
        let sink = MemorySink::default();
        sink.refuse([5; 16]);
        sink.refuse([12; 16]);
        let rows: Vec<_> = (0..16).map(row).collect();
        let mut dead = Vec::new();
        let mut resend = Resend::new(&rows);
        while let Some((r, e)) = resend.next_refused(&sink, |_| None).await.unwrap() {
            assert_eq!(e.failure(), Failure::Refused);
            dead.push(r.event_id[0]);
        }
        assert_eq!(dead, [5, 12]);
        assert_eq!((resend.shipped, resend.refused), (14, 2));
        let shipped: Vec<u8> = sink.table().iter().map(|r| r.event_id[0]).collect();
        let expected: Vec<u8> = (0..16).filter(|n| ![5, 12].contains(n)).collect();
        assert_eq!(shipped, expected, "in order, each once");
        // Bisection, not one insert per row: 16 rows, 2 refused, 4 levels.
        assert!(
            sink.inserts() <= 1 + 2 * 2 * 4,
            "{} inserts",
            sink.inserts()
        );
    }
}
