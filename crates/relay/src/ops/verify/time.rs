//! Times as `verify` reads and prints them (RFC 3339 through `jiff`, Unix microseconds inside).

use jiff::fmt::temporal::DateTimePrinter;
use jiff::{Span, SpanTotal, Timestamp, Unit};

/// Unix µs as RFC 3339 (UTC, microseconds).
pub fn format_us(us: i64) -> String {
    match Timestamp::from_microsecond(us) {
        Ok(ts) => DateTimePrinter::new()
            .precision(Some(6))
            .timestamp_to_string(&ts),
        Err(_) => format!("{us} µs after 1970"),
    }
}

/// Parses `--since`/`--until`: RFC 3339 (`2026-11-28T04:00:00Z`, an offset or `Z` required) or
/// an age like `90m`, `6h`, `2d`, `30s`, `1h30m` (that long before `now_us`).
pub fn parse_time(text: &str, now_us: i64) -> Result<i64, String> {
    let text = text.trim();
    let bad = || {
        format!(
            "{text:?} is not a time: use RFC 3339 (2026-11-28T04:00:00Z) or an age like 30s, 90m, \
             6h, 2d"
        )
    };
    if let Ok(ts) = text.parse::<Timestamp>() {
        return Ok(ts.as_microsecond());
    }
    let span: Span = text.parse().map_err(|_| bad())?;
    let micros = span
        .total(SpanTotal::from(Unit::Microsecond).days_are_24_hours())
        .map_err(|_| bad())?;
    if !micros.is_finite() || micros < 0.0 {
        return Err(bad());
    }
    Ok(now_us.saturating_sub(micros as i64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        for us in [0, 1_764_302_400_123_456, -1, -62_135_596_800_000_000] {
            assert_eq!(parse_time(&format_us(us), 0), Ok(us), "{}", format_us(us));
        }
        assert_eq!(format_us(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            parse_time("2026-11-28T05:00:00+01:00", 0),
            parse_time("2026-11-28T04:00:00Z", 0)
        );
        let now = 10_000_000_000;
        assert_eq!(parse_time("90m", now), Ok(now - 5_400_000_000));
        assert_eq!(parse_time("2d", now), Ok(now - 172_800_000_000));
        assert_eq!(parse_time("1h30m", now), Ok(now - 5_400_000_000));
        for bad in [
            "",
            "yesterday",
            "2026-11-28T04:00:00",
            "-3h",
            "2026-13-01T00:00:00Z",
        ] {
            assert!(parse_time(bad, now).is_err(), "{bad:?}");
        }
    }
}
