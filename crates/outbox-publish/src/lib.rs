//! Publish events to the transactional outbox from Rust, inside the caller's own transaction.
//!
//! The contract stays one plain SQL statement (`INSERT INTO event_outbox (event_type,
//! event_context) VALUES ($1, $2)`); this crate only adds types around it. The event is
//! committed or rolled back with the transaction it is published in.
//!
//! ```no_run
//! use outbox_publish::{Event, Publisher};
//! use serde::Serialize;
//!
//! #[derive(Serialize)]
//! struct AccountUpgraded {
//!     account_id: i64,
//!     plan: &'static str,
//! }
//!
//! impl Event for AccountUpgraded {
//!     const EVENT_TYPE: &'static str = "account.upgraded";
//! }
//!
//! # async fn example(client: &mut tokio_postgres::Client) -> Result<(), Box<dyn std::error::Error>> {
//! let publisher = Publisher::default(); // table public.event_outbox
//! let tx = client.transaction().await?;
//! tx.execute("UPDATE accounts SET plan = 'pro' WHERE id = $1", &[&42i64]).await?;
//! let event_id = publisher
//!     .publish(&tx, &AccountUpgraded { account_id: 42, plan: "pro" })
//!     .await?;
//! tx.commit().await?; // the event exists from here on, and only if this commits
//! # let _ = event_id;
//! # Ok(())
//! # }
//! ```

use serde::Serialize;
use tokio_postgres::GenericClient;
use uuid::Uuid;

/// A typed event: its type name and a context that serializes to a JSON object.
pub trait Event: Serialize {
    /// The `event_type` column.
    const EVENT_TYPE: &'static str;
}

/// Why an event was not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("event context of {event_type:?} cannot be serialized to JSON: {source}")]
    Serialize {
        event_type: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "event context of {0:?} must serialize to a JSON object (the outbox refuses other JSON values)"
    )]
    NotAnObject(String),
    #[error("inserting event {event_type:?} into the outbox failed: {detail}")]
    Insert {
        event_type: String,
        /// PostgreSQL's own message (e.g. which check constraint refused the row).
        detail: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// Inserts events into one outbox table.
#[derive(Debug, Clone)]
pub struct Publisher {
    insert: String,
}

impl Default for Publisher {
    fn default() -> Self {
        Publisher::new("public", "event_outbox")
    }
}

impl Publisher {
    /// A publisher for `schema.table` (the relay's `outbox_schema` and `outbox_table`).
    pub fn new(schema: &str, table: &str) -> Publisher {
        let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
        Publisher {
            insert: format!(
                "INSERT INTO {}.{} (event_type, event_context) VALUES ($1, $2::text::json) RETURNING event_id",
                quote(schema),
                quote(table)
            ),
        }
    }

    /// Publishes a typed event; returns its `event_id`.
    pub async fn publish<C: GenericClient, E: Event>(
        &self,
        client: &C,
        event: &E,
    ) -> Result<Uuid, PublishError> {
        let context = serde_json::to_string(event).map_err(|source| PublishError::Serialize {
            event_type: E::EVENT_TYPE.to_string(),
            source,
        })?;
        self.publish_raw(client, E::EVENT_TYPE, &context).await
    }

    /// Publishes an event whose context is JSON text already; it is stored byte for byte.
    pub async fn publish_raw<C: GenericClient>(
        &self,
        client: &C,
        event_type: &str,
        context_json: &str,
    ) -> Result<Uuid, PublishError> {
        if !context_json.trim_start().starts_with('{') {
            return Err(PublishError::NotAnObject(event_type.to_string()));
        }
        let row = client
            .query_one(&self.insert, &[&event_type, &context_json])
            .await
            .map_err(|source| PublishError::Insert {
                event_type: event_type.to_string(),
                detail: match source.as_db_error() {
                    Some(db) => format!(
                        "{}{}",
                        db.message(),
                        db.constraint()
                            .map(|c| format!(" (constraint {c})"))
                            .unwrap_or_default()
                    ),
                    None => source.to_string(),
                },
                source,
            })?;
        Ok(row.get(0))
    }
}
