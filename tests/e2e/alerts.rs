//! The shipped alert rules (deploy/prometheus/outbox-relay.rules.yml): `promtool test rules`
//! against the recorded series in outbox-relay.rules.test.yml (skipped, with a message, where
//! promtool, Debian's `prometheus` package, is not installed), and every series the rules name
//! is one the relay exports.

use std::path::PathBuf;
use std::process::Command;

fn rules_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus")
}

#[test]
fn promtool_tests_the_rules() {
    let dir = rules_dir();
    let promtool = match Command::new("promtool").arg("--version").output() {
        Ok(out) if out.status.success() => "promtool",
        _ => {
            return println!(
                "skipped: promtool not found (Debian package `prometheus`); the alert rules are \
                 not tested here"
            );
        }
    };
    for args in [
        ["check", "rules", "outbox-relay.rules.yml"],
        ["test", "rules", "outbox-relay.rules.test.yml"],
    ] {
        let out = Command::new(promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("run promtool");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("promtool {}:\n{text}", args.join(" "));
        assert!(
            out.status.success(),
            "promtool {} failed:\n{text}",
            args.join(" ")
        );
    }
}

#[test]
fn rules_name_only_series_the_relay_exports() {
    use relay::metrics::{Format, Metrics};
    let rules = std::fs::read_to_string(rules_dir().join("outbox-relay.rules.yml")).unwrap();
    let metrics = Metrics::default();
    metrics.slot_seen(Some(0), Some("reserved"));
    // Sample names, as Prometheus stores them, in both formats `/metrics` is served in.
    for format in [Format::OpenMetrics, Format::Prometheus] {
        let exported = metrics.render(0, format).unwrap();
        let mut named = 0;
        for (i, _) in rules.match_indices("outbox_relay_") {
            let name: String = rules[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            named += 1;
            assert!(
                exported.lines().any(|l| l
                    .strip_prefix(&name)
                    .is_some_and(|rest| rest.starts_with([' ', '{']))),
                "the rules name {name}, which the relay does not export ({format:?})"
            );
        }
        assert!(named >= 8, "only {named} series named in the rules");
    }
}
