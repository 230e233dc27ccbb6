//! The Django package (python/outbox-relay-django) end to end: a fresh virtualenv, `pip install`
//! of the package from the checkout (wheels from the wheelhouse tools/bootstrap.sh filled, no
//! network), a minimal Django project (its tests/testproject) migrated on a real PostgreSQL,
//! the package's own pytest suite there (pytest-django: encoding, errors, the fixture, the check),
//! then events published by the project reaching ClickHouse through the relay: committed ones
//! once, rolled-back ones (also a rolled-back savepoint in a committed block) never, each context
//! as the exact text expected. And the migration's table is the one `migrations/postgres/` makes.
//!
//! Two runs, each on its own servers: PostgreSQL 15, Django 4.2 LTS with psycopg2, `migrate`
//! before `outbox-relay setup`; PostgreSQL 18, Django 5.2 with psycopg 3, structlog and the Sentry
//! SDK, `setup` before `migrate`.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::{Fixture, stderr};
use harness::PgVersion;

#[test]
fn pg15_django_4_2_migrate_then_setup() {
    scenario(PgVersion::V15, "4.2", Order::MigrateThenSetup);
}

#[test]
fn pg18_django_5_2_setup_then_migrate() {
    scenario(PgVersion::V18, "5.2", Order::SetupThenMigrate);
}

#[derive(PartialEq)]
enum Order {
    MigrateThenSetup,
    SetupThenMigrate,
}

fn scenario(version: PgVersion, django: &'static str, order: Order) {
    let started = Instant::now();
    // The virtualenv is made while the servers start.
    let venv = std::thread::spawn(move || Venv::create(django));
    let f = Fixture::start_without_setup(version, &[]);
    let venv = venv.join().expect("virtualenv");
    let url = f.pg.url(&f.db);

    migration_matches_sql(&f, &venv);

    match order {
        Order::MigrateThenSetup => {
            venv.manage(&url, &["migrate"], &[]);
            let out = f.relay(&["setup"]);
            assert!(
                out.status.success(),
                "setup after migrate: {}",
                stderr(&out)
            );
        }
        Order::SetupThenMigrate => {
            let out = f.relay(&["setup"]);
            assert!(out.status.success(), "setup: {}", stderr(&out));
            let before = describe(&f, &f.db);
            venv.manage(&url, &["migrate"], &[]);
            assert_eq!(
                describe(&f, &f.db),
                before,
                "migrate changed setup's outbox table"
            );
        }
    }
    let check = venv.manage(&url, &["check"], &[]);
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("no issues"),
        "manage.py check: {}",
        String::from_utf8_lossy(&check.stdout)
    );

    // The package's own tests, in the test database pytest-django makes with the migrations.
    let out = venv.run(
        &["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"],
        &url,
        &[],
    );
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pytest:\n{summary}\n{}", stderr(&out));
    let passed = summary
        .lines()
        .filter_map(|l| {
            l.split(" passed")
                .next()?
                .rsplit(' ')
                .next()?
                .parse::<u32>()
                .ok()
        })
        .next_back()
        .unwrap_or(0);
    assert!(passed >= 40, "pytest ran {passed} tests:\n{summary}");

    // The scenario, through the relay.
    let relay = f.spawn_relay();
    let manifest_path = std::env::temp_dir().join(harness::unique_name("django-manifest"));
    let out = venv.manage(
        &url,
        &[
            "publish_scenario",
            "--manifest",
            manifest_path.to_str().unwrap(),
        ],
        &[
            ("OUTBOX_ENVIRONMENT", "staging"),
            ("OUTBOX_METADATA_VERSION", "3"),
        ],
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).expect("manifest"))
            .expect("manifest is JSON");
    let _ = std::fs::remove_file(&manifest_path);
    let committed = manifest["committed"].as_array().unwrap();
    let rolled_back: HashSet<&str> = manifest["rolled_back"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(rolled_back.len(), 4, "{manifest}");

    f.wait_for_rows(
        committed.len() as u64,
        Duration::from_secs(120),
        Some(&relay),
    );
    // Give the relay every chance to ship a wrong row: wait for the slot to catch up.
    assert!(common::wait_until(Duration::from_secs(120), || f.status()
        ["caught_up"]
        == true));
    let rows = f.ch(
        "SELECT toString(event_id) AS event_id, event_type, event_context AS context, environment,
                metadata_version, trace_id
           FROM {db}.event_log FORMAT JSONEachRow SETTINGS output_format_json_quote_64bit_integers = 0",
    );
    let mut in_clickhouse: HashMap<String, serde_json::Value> = HashMap::new();
    for line in rows.lines() {
        let row: serde_json::Value = serde_json::from_str(line).expect("JSONEachRow");
        let id = row["event_id"].as_str().unwrap().to_string();
        assert!(
            !rolled_back.contains(id.as_str()),
            "rolled back, yet shipped: {row}"
        );
        assert!(
            in_clickhouse.insert(id, row).is_none(),
            "shipped twice: {line}"
        );
    }
    assert_eq!(in_clickhouse.len(), committed.len(), "{rows}");
    for expected in committed {
        let id = expected["event_id"].as_str().unwrap();
        assert_eq!(in_clickhouse.get(id), Some(expected), "event {id}");
    }
    let types: HashSet<&str> = committed
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert!(types.contains("e2e.typed") && types.contains("e2e.after_savepoint"));

    if django == "5.2" {
        // structlog and Sentry are installed here: the request's context and trace travelled.
        assert!(
            types.contains("e2e.structlog") && types.contains("e2e.sentry"),
            "{types:?}"
        );
        let log_id = manifest["log_line_event_id"].as_str().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find(|l| l.contains(&format!("event_id={log_id}")))
            .unwrap_or_else(|| panic!("no log line with event {log_id}:\n{stdout}"));
        assert!(line.contains("request_id=req-e2e-1"), "{line}");
    } else {
        assert!(
            !types.contains("e2e.structlog"),
            "structlog is not installed for 4.2"
        );
    }
    eprintln!(
        "django {django} on {version:?}: {} events shipped, {} rolled back, {passed} package tests, {:.1} s",
        committed.len(),
        rolled_back.len(),
        started.elapsed().as_secs_f64()
    );
}

/// The table the Django migration makes (in a database of its own) is the one
/// `migrations/postgres/0001_event_outbox.sql` makes, by PostgreSQL's catalogs; and the comparison
/// bites: the SQL with one column changed makes a table that differs.
fn migration_matches_sql(f: &Fixture, venv: &Venv) {
    let sql_path = harness::workspace_root().join("migrations/postgres/0001_event_outbox.sql");
    let sql = std::fs::read_to_string(&sql_path).expect("migrations/postgres");
    let (by_django, by_sql, by_changed_sql) = (
        harness::unique_name("by_django"),
        harness::unique_name("by_sql"),
        harness::unique_name("by_changed_sql"),
    );
    for db in [&by_django, &by_sql, &by_changed_sql] {
        f.pg.create_database(db).expect("create database");
    }
    venv.manage(&f.pg.url(&by_django), &["migrate", "outbox_relay"], &[]);
    f.pg.psql(&by_sql, &sql).expect("apply migrations/postgres");
    let column = "metadata_version bigint      NOT NULL DEFAULT 1";
    assert!(
        sql.contains(column),
        "the bite below needs `{column}` in {sql_path:?}"
    );
    let changed = sql.replacen(column, "metadata_version integer     NOT NULL DEFAULT 1", 1);
    f.pg.psql(&by_changed_sql, &changed)
        .expect("apply changed SQL");

    let (django, sql) = (describe(f, &by_django), describe(f, &by_sql));
    let only_in = |a: &str, b: &str| -> Vec<String> {
        let b: HashSet<&str> = b.lines().collect();
        a.lines()
            .filter(|l| !b.contains(l))
            .map(str::to_string)
            .collect()
    };
    assert!(
        django == sql,
        "the Django migration's outbox differs from migrations/postgres/0001_event_outbox.sql:\n\
         only from the migration: {:#?}\nonly from the SQL: {:#?}",
        only_in(&django, &sql),
        only_in(&sql, &django)
    );
    // The descriptions hold what they should (an empty one would compare equal too).
    for line in [
        "column 6 metadata_version bigint NOT NULL DEFAULT 1 STORAGE p",
        "constraint event_outbox_event_context_check c CHECK ((json_typeof(event_context) = 'object'::text))",
        "index CREATE INDEX event_outbox_event_date_time_brin ON public.event_outbox USING brin (event_date_time)",
    ] {
        assert!(
            django.lines().any(|l| l == line),
            "{line} missing in\n{django}"
        );
    }
    let changed = describe(f, &by_changed_sql);
    assert_eq!(
        only_in(&changed, &django),
        ["column 6 metadata_version integer NOT NULL DEFAULT 1 STORAGE p"],
        "a changed column must show"
    );
    // On a shared external server, nothing left behind (a local one is thrown away whole).
    for db in [&by_django, &by_sql, &by_changed_sql] {
        f.pg.psql("postgres", &format!("DROP DATABASE \"{db}\" WITH (FORCE)"))
            .expect("drop database");
    }
}

/// The outbox table as PostgreSQL's catalogs describe it: columns (position, type, NOT NULL,
/// default, identity, generation, collation), constraints, indexes, storage and triggers.
fn describe(f: &Fixture, db: &str) -> String {
    const DESCRIBE: &str = "
WITH t AS (SELECT 'public.event_outbox'::regclass AS oid)
SELECT line FROM (
  SELECT 'column ' || a.attnum || ' ' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
         || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END
         || coalesce(' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid), '')
         || CASE WHEN a.attidentity <> '' THEN ' IDENTITY ' || a.attidentity::text ELSE '' END
         || CASE WHEN a.attgenerated <> '' THEN ' GENERATED ' || a.attgenerated::text ELSE '' END
         || CASE WHEN a.attcollation <> 0 THEN ' COLLATE ' || a.attcollation::regcollation::text ELSE '' END
         || ' STORAGE ' || a.attstorage::text AS line
    FROM t JOIN pg_attribute a ON a.attrelid = t.oid
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
   WHERE a.attnum > 0 AND NOT a.attisdropped
  UNION ALL
  SELECT 'constraint ' || c.conname || ' ' || c.contype::text || ' ' || pg_get_constraintdef(c.oid)
         || CASE WHEN c.condeferrable THEN ' DEFERRABLE' ELSE '' END
         || CASE WHEN c.convalidated THEN '' ELSE ' NOT VALID' END
    FROM t JOIN pg_constraint c ON c.conrelid = t.oid
  UNION ALL
  SELECT 'index ' || pg_get_indexdef(i.indexrelid) FROM t JOIN pg_index i ON i.indrelid = t.oid
  UNION ALL
  SELECT 'table ' || c.relkind::text || ' ' || c.relpersistence::text || ' ' || c.relreplident::text || ' '
         || coalesce((SELECT amname FROM pg_am WHERE oid = c.relam), '') || ' '
         || coalesce(array_to_string(c.reloptions, ','), '') || ' ' || c.relrowsecurity::text
    FROM t JOIN pg_class c ON c.oid = t.oid
  UNION ALL
  SELECT 'trigger ' || tg.tgname FROM t JOIN pg_trigger tg ON tg.tgrelid = t.oid
   WHERE NOT tg.tgisinternal
) lines ORDER BY line;";
    f.pg.psql(db, DESCRIBE)
        .unwrap_or_else(|e| panic!("describe the outbox in {db}: {e:#}"))
}

/// A fresh virtualenv with the package and the pinned wheels of
/// tools/requirements-django-<version>.txt, removed when dropped.
struct Venv {
    dir: PathBuf,
}

impl Venv {
    fn create(django: &str) -> Venv {
        let root = harness::workspace_root();
        let wheelhouse = root.join(format!(".venv/wheelhouse/django-{django}"));
        assert!(
            wheelhouse.is_dir(),
            "{} is missing: run `bash tools/bootstrap.sh`",
            wheelhouse.display()
        );
        let venv = Venv {
            dir: std::env::temp_dir().join(harness::unique_name(&format!("django-{django}"))),
        };
        run(Command::new(root.join(".venv/bin/python"))
            .args(["-m", "venv"])
            .arg(&venv.dir));
        // From the checkout (its build backend, flit_core, writes nothing into the tree).
        run(Command::new(venv.dir.join("bin/pip"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-index",
            ])
            .arg("--find-links")
            .arg(&wheelhouse)
            .arg("-r")
            .arg(root.join(format!("tools/requirements-django-{django}.txt")))
            .arg(root.join("python/outbox-relay-django"))
            .env("PIP_CONFIG_FILE", "/dev/null"));
        venv
    }

    /// Runs the venv's python in the package's directory of the checkout (its tests and
    /// pyproject.toml), the package itself imported from the venv.
    fn run(&self, args: &[&str], db_url: &str, env: &[(&str, &str)]) -> Output {
        let root = harness::workspace_root();
        Command::new(self.dir.join("bin/python"))
            .args(args)
            .current_dir(root.join("python/outbox-relay-django"))
            .env("OUTBOX_TEST_DATABASE_URL", db_url)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env_remove("DJANGO_SETTINGS_MODULE")
            .envs(env.iter().copied())
            .output()
            .expect("run the venv's python")
    }

    /// `manage.py ARGS` of the test project; panics with its output when it fails.
    fn manage(&self, db_url: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut all = vec!["tests/manage.py"];
        all.extend_from_slice(args);
        let out = self.run(&all, db_url, env);
        assert!(
            out.status.success(),
            "manage.py {args:?}:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        );
        out
    }
}

impl Drop for Venv {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}:\n{}", stderr(&out));
}
