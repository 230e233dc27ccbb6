//! Whether the publication streams the outbox table's inserts, and under which identity: the
//! check every session runs when it starts, every 5 s and inside every checkpoint's snapshot
//! (docs/guarantees.md, point 6).

use tokio_postgres::Client;

use crate::config::Config;
use crate::pg::PgError;
use crate::store::schema::{coverage_log_table, coverage_watch_trigger};

pub use crate::store::schema::base_fingerprint_sql;

/// The newest entry of the coverage watch's log (0 when empty: no watch installed): part of the
/// fingerprint, so that a change and its undoing between two checks still changes it.
pub fn watch_id_sql(config: &Config) -> String {
    format!(
        "(SELECT coalesce(max(id), 0)::text FROM {})",
        coverage_log_table(config)
    )
}

/// Whether the coverage watch's event trigger exists and fires (docs/guarantees.md).
pub async fn coverage_watch_installed(client: &Client, config: &Config) -> Result<bool, PgError> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = $1 AND evtenabled <> 'D')",
            &[&coverage_watch_trigger(config)],
        )
        .await
        .map_err(PgError::query("coverage watch check"))?
        .get(0))
}

/// Whether the publication streams the outbox table's inserts, and under which identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Coverage {
    /// Streamed. The fingerprint (`publication oid/table oid/membership oid/watch log id`)
    /// changes when the publication is created again, the table is swapped or taken out and put
    /// back (the coverage watch's log id: even when undone before this check).
    Covered { fingerprint: String },
    /// Not streamed: PostgreSQL skips the outbox's inserts; `why` says why and what to do.
    /// `table`: the oid of the table that has the outbox's name, when there is one (its inserts
    /// are the ones skipped).
    Uncovered { why: String, table: Option<u32> },
}

/// Checks that the publication exists, publishes inserts and contains the outbox table (the one
/// that has the name now, by oid).
pub async fn coverage(client: &Client, config: &Config) -> Result<Coverage, PgError> {
    let row = client
        .query_opt(
            &format!(
                "SELECT p.oid::text, p.pubinsert, p.puballtables,
                        t.oid::text,
                        (SELECT r.oid::text FROM pg_publication_rel r
                          WHERE r.prpubid = p.oid AND r.prrelid = t.oid),
                        (SELECT pn.oid::text FROM pg_publication_namespace pn
                          WHERE pn.pnpubid = p.oid AND pn.pnnspid = t.relnamespace),
                        {},
                        (SELECT pg_get_expr(r.prqual, r.prrelid) FROM pg_publication_rel r
                          WHERE r.prpubid = p.oid AND r.prrelid = t.oid)
                   FROM pg_publication p
                   LEFT JOIN (SELECT c.oid, c.relnamespace FROM pg_class c
                                JOIN pg_namespace n ON n.oid = c.relnamespace
                               WHERE n.nspname = $2 AND c.relname = $3) t ON true
                  WHERE p.pubname = $1",
                watch_id_sql(config)
            ),
            &[
                &config.publication,
                &config.outbox_schema,
                &config.outbox_table,
            ],
        )
        .await
        .map_err(PgError::query("publication check"))?;
    let names = format!(
        "publication {:?}, outbox table {:?}.{:?}",
        config.publication, config.outbox_schema, config.outbox_table
    );
    let Some(row) = row else {
        return Ok(Coverage::Uncovered {
            why: format!(
                "publication {:?} does not exist, so PostgreSQL skips every outbox insert: \
                 create it with `outbox-relay setup`; the relay then re-ships what was committed \
                 meanwhile from the outbox table",
                config.publication
            ),
            table: None,
        });
    };
    let (publication, inserts, all_tables): (String, bool, bool) =
        (row.get(0), row.get(1), row.get(2));
    let table: Option<String> = row.get(3);
    let member: Option<String> = row.get::<_, Option<String>>(4).or(row.get(5));
    let Some(table) = table else {
        return Ok(Coverage::Uncovered {
            why: format!("{names}: the outbox table does not exist: run `outbox-relay setup`"),
            table: None,
        });
    };
    let table_oid = table.parse().ok();
    if !inserts {
        return Ok(Coverage::Uncovered {
            why: format!(
                "{names}: the publication does not publish inserts, so PostgreSQL skips the \
                 outbox's events: ALTER PUBLICATION ... SET (publish = 'insert'); the relay then \
                 re-ships what was committed meanwhile"
            ),
            table: table_oid,
        });
    }
    if let Some(filter) = row.get::<_, Option<String>>(7) {
        return Ok(Coverage::Uncovered {
            why: format!(
                "{names}: the publication has a row filter on the outbox table (WHERE {filter}), \
                 so PostgreSQL never streams the rows it filters out: ALTER PUBLICATION ... SET \
                 TABLE ... without WHERE; the relay then re-ships what was committed meanwhile"
            ),
            table: table_oid,
        });
    }
    let member = match (member, all_tables) {
        (Some(member), _) => member,
        (None, true) => "all".to_string(),
        (None, false) => {
            return Ok(Coverage::Uncovered {
                why: format!(
                    "{names}: the outbox table (oid {table}) is not in the publication (was it \
                     replaced by another table of that name?), so PostgreSQL skips its inserts: \
                     ALTER PUBLICATION ... ADD TABLE ..., or run `outbox-relay setup` on a new \
                     publication; the relay then re-ships what was committed meanwhile"
                ),
                table: table_oid,
            });
        }
    };
    let watched: String = row.get(6);
    Ok(Coverage::Covered {
        fingerprint: format!("{publication}/{table}/{member}/{watched}"),
    })
}
