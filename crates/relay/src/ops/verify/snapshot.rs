//! Which transactions a PostgreSQL snapshot sees, told in PostgreSQL and in ClickHouse alike.
//!
//! Every ClickHouse row carries its transaction's 64-bit id (`xid`), so a snapshot's
//! `xmin:xmax:xip` list says, inside ClickHouse, which rows it sees: the cut between what a
//! pass compares and what is still on its way is exact, with no grace period and no race.

/// A PostgreSQL snapshot (`pg_snapshot`): it sees a committed transaction below `xmin`, and one
/// below `xmax` that is not in `xip`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub xmin: u64,
    pub xmax: u64,
    pub xip: Vec<u64>,
}

impl Snapshot {
    /// Reads `pg_snapshot`'s text form, `xmin:xmax:xip,xip,...`.
    pub fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.trim().splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<Vec<u64>>>()?,
        };
        (xmin <= xmax).then_some(Snapshot { xmin, xmax, xip })
    }

    /// Whether it sees (the commit of) committed transaction `xid`. 0 (not known) counts as
    /// seen by every snapshot.
    pub fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.xip.contains(&xid))
    }

    /// [`Snapshot::sees`] of the xid8 `x` as an SQL condition (PostgreSQL and ClickHouse
    /// alike: integer comparisons and an `IN` list).
    pub fn sql_sees(&self, x: &str) -> String {
        let (xmin, xmax) = (self.xmin, self.xmax);
        match self.xip.is_empty() {
            true => format!("({x} < {xmax})"),
            false => format!(
                "({x} < {xmin} OR ({x} < {xmax} AND {x} NOT IN ({})))",
                self.list()
            ),
        }
    }

    /// The opposite of [`Snapshot::sql_sees`].
    pub fn sql_misses(&self, x: &str) -> String {
        let (xmin, xmax) = (self.xmin, self.xmax);
        match self.xip.is_empty() {
            true => format!("({x} >= {xmax})"),
            false => format!(
                "({x} >= {xmax} OR ({x} >= {xmin} AND {x} IN ({})))",
                self.list()
            ),
        }
    }

    fn list(&self) -> String {
        self.xip
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The 64-bit id of outbox row `o`'s inserting transaction (its `xmin`, a 32-bit xid, in the
/// epoch of `near`, an xid8 of now: the previous one when its low bits are ahead of `near`'s).
/// A row inserted in a savepoint has the savepoint's xid here, where the live stream writes its
/// top-level transaction's; both sides of a comparison treat it alike (see `sums.rs`).
pub fn pg_row_xid(near: u64) -> String {
    let base = near & !0xffff_ffff;
    let low = near & 0xffff_ffff;
    format!(
        "({base}::int8 + o.xmin::text::int8 - CASE WHEN o.xmin::text::int8 > {low} \
         THEN 4294967296 ELSE 0 END)"
    )
}

/// What the snapshot statement read.
pub struct Taken {
    pub snapshot: Snapshot,
    /// No transaction with an xid from here on had one when the snapshot was taken (a
    /// snapshot's xmax is one past the newest *completed* xid: a transaction that got a newer one
    /// may be running, seen by neither its xip nor its xmin).
    pub next_xid: u64,
    /// The WAL insert position right after the snapshot was taken.
    pub fence: String,
    pub started_us: i64,
    /// The dead letters' (count, hash of their rows).
    pub dead: (i64, i64),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_sees_as_postgresql_does() {
        let s = Snapshot::parse("100:110:102,105").expect("snapshot");
        assert_eq!(s.xip, vec![102, 105]);
        for (xid, seen) in [
            (0, true),
            (99, true),
            (100, true),
            (102, false),
            (105, false),
        ] {
            assert_eq!(s.sees(xid), seen, "{xid}");
        }
        assert!(!s.sees(110) && !s.sees(200) && s.sees(109));
        let empty = Snapshot::parse("7:7:").expect("snapshot");
        assert!(empty.sees(6) && !empty.sees(7));
        assert_eq!(Snapshot::parse("9:7:"), None);
        assert_eq!(Snapshot::parse("x:7:"), None);
        assert_eq!(Snapshot::parse("1:7:3,y"), None);
    }

    #[test]
    fn sql_conditions_are_complements() {
        let s = Snapshot::parse("100:110:102,105").expect("snapshot");
        assert_eq!(
            s.sql_sees("xid"),
            "(xid < 100 OR (xid < 110 AND xid NOT IN (102,105)))"
        );
        assert_eq!(
            s.sql_misses("xid"),
            "(xid >= 110 OR (xid >= 100 AND xid IN (102,105)))"
        );
        let e = Snapshot::parse("7:7:").expect("snapshot");
        assert_eq!(
            (e.sql_sees("x"), e.sql_misses("x")),
            ("(x < 7)".into(), "(x >= 7)".into())
        );
    }
}
