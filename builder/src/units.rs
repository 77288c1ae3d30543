//! Sizes and durations as docker and Go write them (`10GB`, `1h30m`), for
//! flags and kiln.toml alike. Only parsing: what a value is for is the
//! caller's business.

use std::time::Duration;

use anyhow::{bail, Context};

/// A size as docker's `--keep-storage` takes it: a number with an optional
/// unit b, k, m, g, t (optionally followed by `b` or `ib`, any case), each a
/// power of 1024 (docker's RAMInBytes).
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .with_context(|| format!("size {s:?}: expected a number and a unit, such as 10GB"))?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(&unit);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ => bail!("size {s:?}: unknown unit; use B, KB, MB, GB, TB or PB"),
    };
    // a fractional size (1.5GB) is rounded down to whole bytes
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let bytes = (value * (1u64 << shift) as f64) as u64;
    Ok(bytes)
}

/// A duration as Go's `time.ParseDuration` reads it (what docker's
/// `--keep-duration` uses): a sequence of numbers with units h, m, s, ms,
/// us, ns, such as `48h`, `30m`, `1h30m`, `1.5h`. `d` (days) is accepted
/// too.
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = t;
    let mut total = 0f64;
    if rest.is_empty() {
        bail!("duration {s:?} is empty: use e.g. 48h or 30m");
    }
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..n]
            .parse()
            .with_context(|| format!("duration {s:?}: expected a number before each unit"))?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..u] {
            "d" => 86_400.0,
            "h" => 3_600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            "" => bail!("duration {s:?}: missing unit; use h, m or s (e.g. 48h)"),
            other => bail!("duration {s:?}: unknown unit {other:?}; use h, m, s or ms"),
        };
        total += value * secs;
        rest = &rest[u..];
    }
    Duration::try_from_secs_f64(total).with_context(|| format!("duration {s:?} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_docker_units() {
        assert_eq!(parse_size("10GB").unwrap(), 10 << 30);
        assert_eq!(parse_size("512MB").unwrap(), 512 << 20);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("1KiB").unwrap(), 1024);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert_eq!(parse_size("0").unwrap(), 0);
        assert!(parse_size("10XB").is_err());
        assert!(parse_size("GB").is_err());
    }

    #[test]
    fn durations_read_like_go() {
        assert_eq!(
            parse_duration("48h").unwrap(),
            Duration::from_secs(48 * 3600)
        );
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("48").is_err());
        assert!(parse_duration("2w").is_err());
        assert!(parse_duration("").is_err());
    }
}
