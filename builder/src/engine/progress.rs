//! Build progress: one numbered vertex per step, its start, its output and
//! its end, written as BuildKit-style plain lines or as one JSON event per
//! line (`rawjson`). The solver reports events; this module only formats
//! them, so what a user sees is stable and testable.

use std::io::Write;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Plain,
    RawJson,
    Quiet,
}

impl Mode {
    /// `auto`, `plain`, `tty`, `rawjson`, `quiet`. kiln has no live
    /// terminal view yet, so `tty` is refused rather than silently plain.
    pub fn parse(s: &str) -> Result<Mode, String> {
        match s {
            "auto" | "plain" => Ok(Mode::Plain),
            "rawjson" => Ok(Mode::RawJson),
            "quiet" => Ok(Mode::Quiet),
            "tty" => Err("--progress tty is not supported yet: use plain or rawjson".into()),
            other => Err(format!(
                "unknown --progress mode {other:?}: use auto, plain, rawjson or quiet"
            )),
        }
    }
}

/// The sink every vertex reports to.
pub struct Progress {
    mode: Mode,
    start: Instant,
    out: Mutex<Box<dyn Write + Send>>,
    /// strings never to show (secrets), replaced by `****`
    redact: Vec<String>,
}

fn now_rfc3339() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format_rfc3339(i64::try_from(d.as_secs()).unwrap_or(0), d.subsec_nanos())
}

/// RFC 3339 in UTC for a Unix time (civil-from-days, no time zone data).
pub fn format_rfc3339(secs: i64, nanos: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    if nanos == 0 {
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
    } else {
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{nanos:09}Z")
    }
}

impl Progress {
    pub fn new(mode: Mode, out: Box<dyn Write + Send>, redact: Vec<String>) -> Self {
        Progress {
            mode,
            start: Instant::now(),
            out: Mutex::new(out),
            redact,
        }
    }

    fn emit(&self, plain: impl FnOnce() -> String, event: impl FnOnce() -> serde_json::Value) {
        let line = match self.mode {
            Mode::Quiet => return,
            Mode::Plain => plain(),
            Mode::RawJson => event().to_string(),
        };
        let mut line = line;
        for secret in &self.redact {
            if !secret.is_empty() {
                line = line.replace(secret.as_str(), "****");
            }
        }
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    pub fn started(&self, id: usize, name: &str) {
        self.emit(
            || format!("#{id} {name}"),
            || json!({"vertex": id, "name": name, "started": now_rfc3339()}),
        );
    }

    pub fn cached(&self, id: usize, name: &str) {
        self.emit(
            || format!("#{id} {name}\n#{id} CACHED"),
            || json!({"vertex": id, "name": name, "cached": true, "completed": now_rfc3339()}),
        );
    }

    pub fn log(&self, id: usize, stream: u8, text: &str) {
        let elapsed = self.start.elapsed().as_secs_f64();
        self.emit(
            || format!("#{id} {elapsed:.3} {text}"),
            || json!({"vertex": id, "stream": stream, "log": text, "timestamp": now_rfc3339()}),
        );
    }

    pub fn done(&self, id: usize, secs: f64) {
        self.emit(
            || format!("#{id} DONE {secs:.1}s"),
            || json!({"vertex": id, "completed": now_rfc3339()}),
        );
    }

    pub fn error(&self, id: usize, message: &str) {
        self.emit(
            || format!("#{id} ERROR: {message}"),
            || json!({"vertex": id, "error": message, "completed": now_rfc3339()}),
        );
    }

    pub fn summary(&self, text: &str) {
        self.emit(|| text.to_string(), || json!({"summary": text}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(format_rfc3339(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(1_700_000_000, 0), "2023-11-14T22:13:20Z");
        assert_eq!(
            format_rfc3339(951_782_400, 5),
            "2000-02-29T00:00:00.000000005Z"
        );
    }

    #[test]
    fn modes() {
        assert_eq!(Mode::parse("auto"), Ok(Mode::Plain));
        assert!(Mode::parse("tty").is_err());
        assert!(Mode::parse("fancy").unwrap_err().contains("fancy"));
    }
}
