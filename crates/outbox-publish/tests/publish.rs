//! Against a real PostgreSQL: an event published in a transaction exists exactly when the
//! transaction commits, with its context stored as written.

use harness::{PgServer, PgVersion};
use outbox_publish::{Event, PublishError, Publisher};
use serde::Serialize;

#[derive(Serialize)]
struct OrderCreated {
    order_id: i64,
    total: &'static str,
}

impl Event for OrderCreated {
    const EVENT_TYPE: &'static str = "order.created";
}

#[tokio::test]
async fn publishes_with_the_transaction() {
    let pg = PgServer::start(PgVersion::V15).unwrap();
    let db = harness::unique_name("publish");
    pg.create_database(&db).unwrap();
    // The outbox table exactly as `outbox-relay setup` creates it.
    pg.psql(
        &db,
        &relay::store::schema::postgres_ddl(&relay::Config::default()),
    )
    .unwrap();

    let (mut client, conn) = tokio_postgres::connect(&pg.url(&db), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let publisher = Publisher::default();

    let tx = client.transaction().await.unwrap();
    let committed = publisher
        .publish(
            &tx,
            &OrderCreated {
                order_id: 7,
                total: "10.50",
            },
        )
        .await
        .unwrap();
    let raw = publisher
        .publish_raw(&tx, "raw", r#"{"b": 1,  "a": [1.0, 2e3]}"#)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let tx = client.transaction().await.unwrap();
    let rolled_back = publisher
        .publish(
            &tx,
            &OrderCreated {
                order_id: 8,
                total: "0",
            },
        )
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    let rows = pg
        .psql(
            &db,
            "SELECT event_id, event_type, event_context FROM event_outbox ORDER BY event_type",
        )
        .unwrap();
    assert_eq!(
        rows,
        format!(
            "{committed}|order.created|{{\"order_id\":7,\"total\":\"10.50\"}}\n{raw}|raw|{{\"b\": 1,  \"a\": [1.0, 2e3]}}\n"
        )
    );
    assert!(!rows.contains(&rolled_back.to_string()));

    let err = publisher
        .publish_raw(&client, "bad", "[1]")
        .await
        .unwrap_err();
    assert!(matches!(err, PublishError::NotAnObject(_)), "{err}");
    let err = publisher.publish_raw(&client, "", "{}").await.unwrap_err();
    assert!(err.to_string().contains("event_type_check"), "{err}");
}
