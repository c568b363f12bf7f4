//! Human units in config values: durations like `250ms`, `2s`, `5m` and sizes like `64KiB`, `1MiB`.

use std::time::Duration;

/// Parses `250ms`, `2s`, `1m30s`, `5m`, `1h`. A bare number is refused: `30` could mean
/// seconds or milliseconds, and guessing wrong makes a budget 1000x off.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    if t.starts_with('-') {
        return Err("negative durations are not allowed".into());
    }
    if t.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err("missing unit (write e.g. `250ms`, `2s`, `5m`)".into());
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("not a duration ({e}); write e.g. `250ms`, `2s`, `5m`"))
}

/// Parses `512`, `512B`, `64KiB`, `64KB`, `1MiB`, `2GiB`. Decimal (`KB`) and binary (`KiB`)
/// prefixes are both accepted and mean what they say.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if t.starts_with('-') {
        return Err("negative sizes are not allowed".into());
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err("not a size; write e.g. `64KiB`, `1MiB`".into());
    }
    let n: u64 = num.parse().map_err(|_| "number too large".to_string())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit `{other}`; use B, KB, KiB, MB, MiB, GB or GiB"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| "size too large".to_string())
}

/// Renders a duration the way the config file writes it (`250ms`, `2s`, `5m`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 60_000 == 0 && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 && ms > 0 {
        format!("{}s", ms / 1000)
    } else if ms > 0 {
        format!("{ms}ms")
    } else {
        format!("{}us", d.as_micros())
    }
}

/// Renders a size with the largest exact binary unit.
pub fn format_size(n: u64) -> String {
    for (unit, m) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= m && n % m == 0 {
            return format!("{}{unit}", n / m);
        }
    }
    format!("{n}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("30").unwrap_err().contains("missing unit"));
        assert!(parse_duration("-2s").unwrap_err().contains("negative"));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("1MB").unwrap(), 1_000_000);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size(" 2 GiB ").unwrap(), 2 << 30);
        assert!(parse_size("-1KiB").is_err());
        assert!(parse_size("12XB")
            .unwrap_err()
            .contains("unknown size unit"));
        assert!(parse_size("KiB").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("99999999999GiB").is_err());
    }

    #[test]
    fn formatting_round_trips() {
        for s in ["250ms", "2s", "5m", "1500ms"] {
            assert_eq!(format_duration(parse_duration(s).unwrap()), s);
        }
        for s in ["64KiB", "1MiB", "100B"] {
            assert_eq!(format_size(parse_size(s).unwrap()), s);
        }
    }
}
