//! Build progress: one numbered vertex per step, its start, its output and
//! its end, written as BuildKit-style plain lines, as BuildKit's
//! `SolveStatus` JSON one per line (`rawjson`, what tools that parse
//! buildx's output read), or as kiln's own one-event-per-line JSON
//! (`events`). The solver reports events; this module only formats them,
//! so what a user sees is stable and testable.
//!
//! `tty` is a live view: running vertices with a timer and their last few
//! output lines, redrawn in place a few times a second, finished vertices
//! printed once above it as permanent lines. The frame is built by the pure
//! [`render_frame`], so it is unit-tested without a terminal.

use std::collections::{BTreeMap, VecDeque};
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::json;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Plain,
    Tty,
    /// BuildKit's SolveStatus, one per line
    RawJson,
    /// kiln's own events, one per line
    Events,
    Quiet,
}

impl Mode {
    /// `auto`, `plain`, `tty`, `rawjson`, `events`, `quiet`. `auto` is `tty` when
    /// `stderr_is_terminal`, else `plain` (as BuildKit decides).
    pub fn parse(s: &str, stderr_is_terminal: bool) -> Result<Mode, String> {
        match s {
            "auto" if stderr_is_terminal => Ok(Mode::Tty),
            "auto" | "plain" => Ok(Mode::Plain),
            "tty" => Ok(Mode::Tty),
            "rawjson" => Ok(Mode::RawJson),
            "events" => Ok(Mode::Events),
            "quiet" => Ok(Mode::Quiet),
            other => Err(format!(
                "unknown --progress mode {other:?}: use auto, plain, tty, rawjson, events or quiet"
            )),
        }
    }

    /// [`Mode::parse`] deciding `auto` from the process's real stderr.
    pub fn parse_for_stderr(s: &str) -> Result<Mode, String> {
        Mode::parse(s, std::io::stderr().is_terminal())
    }
}

/// How many output lines of a running vertex the tty view keeps.
pub const TTY_TAIL_LINES: usize = 6;
/// How often the tty view redraws when nothing happens.
const TTY_TICK: Duration = Duration::from_millis(200);

/// One running vertex as the tty view shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningVertex {
    pub id: usize,
    pub name: String,
    pub elapsed_secs: f64,
    /// the last output lines, oldest first, at most [`TTY_TAIL_LINES`]
    pub tail: Vec<String>,
}

/// The live part of the tty view: a header, then each running vertex with
/// its timer and its last output lines. Lines are cut to `width` columns so
/// that a redraw moves the cursor up by exactly the number of lines drawn.
pub fn render_frame(running: &[RunningVertex], elapsed_secs: f64, width: usize) -> Vec<String> {
    let width = width.max(20);
    let cut = |s: String| -> String { s.chars().take(width).collect() };
    let mut lines = vec![cut(format!(
        "[+] Building {elapsed_secs:.1}s ({} running)",
        running.len()
    ))];
    for v in running {
        lines.push(cut(format!("#{} {} {:.1}s", v.id, v.name, v.elapsed_secs)));
        for t in &v.tail {
            lines.push(cut(format!("#{} {}", v.id, t)));
        }
    }
    lines
}

struct TtyVertex {
    name: String,
    start: Instant,
    tail: VecDeque<String>,
}

/// What the tty view has on screen and what it still shows as running.
struct TtyState {
    running: BTreeMap<usize, TtyVertex>,
    /// lines of the live frame currently drawn below the permanent lines
    drawn: usize,
    finished: bool,
}

fn redact(line: &str, secrets: &[String]) -> String {
    let mut line = line.to_string();
    for secret in secrets {
        if !secret.is_empty() {
            line = line.replace(secret.as_str(), "****");
        }
    }
    line
}

/// A byte count for a progress line, in decimal megabytes.
pub fn bytes(n: u64) -> String {
    // precision loss is irrelevant for a one-decimal display
    #[allow(clippy::cast_precision_loss)]
    let mb = n as f64 / 1e6;
    format!("{mb:.1} MB")
}

/// The sink every vertex reports to.
pub struct Progress {
    mode: Mode,
    start: Instant,
    out: Arc<Mutex<Box<dyn Write + Send>>>,
    /// strings never to show (secrets), replaced by `****`
    redact: Vec<String>,
    tty: Arc<Mutex<TtyState>>,
    /// rawjson: each vertex's digest, name and start, which BuildKit
    /// sends again with every change of the vertex
    vertices: Mutex<BTreeMap<usize, SolveVertex>>,
    /// when each transfer (vertex, blob) was last reported
    transfers: Mutex<BTreeMap<(usize, String), Instant>>,
    /// the highest vertex number reported, for [`Progress::new_vertex`]
    highest: std::sync::atomic::AtomicUsize,
    /// the build checks' findings, shown after the build
    lint: Mutex<Option<Vec<crate::frontend::plan::PlanWarning>>>,
}

/// How often a transfer's bytes are reported while it runs.
const TRANSFER_EVERY: Duration = Duration::from_millis(500);

/// A vertex as rawjson reports it.
#[derive(Clone)]
struct SolveVertex {
    digest: String,
    name: String,
    started: String,
}

fn now_rfc3339() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    crate::image::time::format_rfc3339_nanos(
        i64::try_from(d.as_secs()).unwrap_or(0),
        d.subsec_nanos(),
    )
}

impl Progress {
    pub fn new(mode: Mode, out: Box<dyn Write + Send>, redact: Vec<String>) -> Self {
        let progress = Progress {
            mode,
            start: Instant::now(),
            out: Arc::new(Mutex::new(out)),
            redact,
            tty: Arc::new(Mutex::new(TtyState {
                running: BTreeMap::new(),
                drawn: 0,
                finished: false,
            })),
            vertices: Mutex::new(BTreeMap::new()),
            transfers: Mutex::new(BTreeMap::new()),
            highest: std::sync::atomic::AtomicUsize::new(0),
            lint: Mutex::new(None),
        };
        if mode == Mode::Tty {
            // The ticker only holds weak references: it ends by itself when
            // the Progress is dropped or the summary has been printed.
            let (out, tty) = (Arc::downgrade(&progress.out), Arc::downgrade(&progress.tty));
            let (start, secrets) = (progress.start, progress.redact.clone());
            std::thread::spawn(move || ticker(out, tty, start, secrets));
        }
        progress
    }

    fn emit(
        &self,
        plain: impl FnOnce() -> String,
        event: impl FnOnce() -> serde_json::Value,
        status: impl FnOnce() -> Option<serde_json::Value>,
    ) {
        let line = match self.mode {
            Mode::Quiet | Mode::Tty => return,
            Mode::Plain => plain(),
            Mode::Events => event().to_string(),
            Mode::RawJson => match status() {
                Some(s) => s.to_string(),
                None => return,
            },
        };
        let line = redact(&line, &self.redact);
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    /// rawjson: vertex `id` as BuildKit sends it, with `completed` and
    /// the other fields of `extra` when it has ended. Its digest stands for
    /// BuildKit's LLB digest: kiln's vertex number and name, hashed.
    fn solve_vertex(
        &self,
        id: usize,
        name: Option<&str>,
        extra: serde_json::Value,
    ) -> serde_json::Value {
        let mut vertices = self.vertices.lock().unwrap_or_else(|e| e.into_inner());
        let v = vertices.entry(id).or_insert_with(|| {
            let name = name.unwrap_or_default().to_string();
            let hash = <sha2::Sha256 as sha2::Digest>::digest(format!("kiln-vertex {id} {name}"));
            SolveVertex {
                digest: format!("sha256:{}", kiln_snapshotter::content::hex(&hash)),
                name,
                started: now_rfc3339(),
            }
        });
        let mut vertex = json!({"digest": v.digest, "name": v.name, "started": v.started});
        if let (Some(o), Some(e)) = (vertex.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        json!({"vertexes": [vertex]})
    }

    /// rawjson: the digest of vertex `id` (made on its first report).
    fn vertex_digest(&self, id: usize) -> String {
        let vertex = self.solve_vertex(id, None, json!({}));
        vertex["vertexes"][0]["digest"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Applies `change` to the tty state, prints `permanent` lines above the
    /// live frame, and redraws the frame. A no-op outside tty mode.
    fn tty_update(&self, permanent: &[String], change: impl FnOnce(&mut TtyState)) {
        if self.mode != Mode::Tty {
            return;
        }
        let mut state = self.tty.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut state);
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        draw(&mut **out, &mut state, permanent, self.start, &self.redact);
    }

    /// A vertex number after every one reported so far, for work after
    /// the build (an output's push).
    /// Keep the build checks' findings of a planned build; the first
    /// platform's only, as buildx shows them once.
    pub fn add_lint(&self, findings: Vec<crate::frontend::plan::PlanWarning>) {
        let mut lint = self.lint.lock().unwrap_or_else(|e| e.into_inner());
        if lint.is_none() {
            *lint = Some(findings);
        }
    }

    /// The build checks' findings kept by [`Progress::add_lint`].
    pub fn take_lint(&self) -> Vec<crate::frontend::plan::PlanWarning> {
        self.lint
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default()
    }

    pub fn new_vertex(&self) -> usize {
        self.highest
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1
    }

    pub fn started(&self, id: usize, name: &str) {
        self.highest
            .fetch_max(id, std::sync::atomic::Ordering::Relaxed);
        self.tty_update(&[], |s| {
            s.running.insert(
                id,
                TtyVertex {
                    name: name.to_string(),
                    start: Instant::now(),
                    tail: VecDeque::new(),
                },
            );
        });
        self.emit(
            || format!("#{id} {name}"),
            || json!({"vertex": id, "name": name, "started": now_rfc3339()}),
            || Some(self.solve_vertex(id, Some(name), json!({}))),
        );
    }

    pub fn cached(&self, id: usize, name: &str) {
        self.highest
            .fetch_max(id, std::sync::atomic::Ordering::Relaxed);
        self.tty_update(&[format!("#{id} {name}"), format!("#{id} CACHED")], |s| {
            s.running.remove(&id);
        });
        self.emit(
            || format!("#{id} {name}\n#{id} CACHED"),
            || json!({"vertex": id, "name": name, "cached": true, "completed": now_rfc3339()}),
            || {
                let done = json!({"cached": true, "completed": now_rfc3339()});
                Some(self.solve_vertex(id, Some(name), done))
            },
        );
    }

    pub fn log(&self, id: usize, stream: u8, text: &str) {
        self.tty_update(&[], |s| {
            if let Some(v) = s.running.get_mut(&id) {
                for line in text.lines() {
                    if v.tail.len() == TTY_TAIL_LINES {
                        v.tail.pop_front();
                    }
                    v.tail.push_back(line.to_string());
                }
            }
        });
        let elapsed = self.start.elapsed().as_secs_f64();
        self.emit(
            || format!("#{id} {elapsed:.3} {text}"),
            || json!({"vertex": id, "stream": stream, "log": text, "timestamp": now_rfc3339()}),
            || {
                // masked before it is encoded, where no mask would find it
                let data = format!("{}\n", redact(text, &self.redact));
                let data = base64::engine::general_purpose::STANDARD.encode(data);
                Some(json!({"logs": [{
                    "vertex": self.vertex_digest(id),
                    "stream": stream,
                    "data": data,
                    "timestamp": now_rfc3339(),
                }]}))
            },
        );
    }

    /// How long one part of a step took (the checksum of its sources, the
    /// copy, the layer diff...), as BuildKit prints "transferring context:
    /// ... done": where a step's time goes, in plain and rawjson output.
    pub fn phase(&self, id: usize, what: &str, since: Instant) {
        let secs = since.elapsed().as_secs_f64();
        self.emit(
            || format!("#{id} {what} {secs:.2}s"),
            || json!({"vertex": id, "phase": what, "seconds": secs}),
            || {
                let now = now_rfc3339();
                Some(json!({"statuses": [{
                    "id": what,
                    "vertex": self.vertex_digest(id),
                    "name": what,
                    "current": 0,
                    "timestamp": now,
                    "completed": now,
                }]}))
            },
        );
    }

    /// Bytes of a transfer of vertex `id` (`what`: a blob being pulled):
    /// `done` of `total`. Reported when it starts, at most every half
    /// second while it runs, and when it is whole.
    pub fn transfer(&self, id: usize, what: &str, done: u64, total: u64) {
        let whole = done >= total;
        {
            let mut seen = self.transfers.lock().unwrap_or_else(|e| e.into_inner());
            let key = (id, what.to_string());
            match seen.get(&key) {
                Some(t) if !whole && t.elapsed() < TRANSFER_EVERY => return,
                _ => {}
            }
            seen.insert(key, Instant::now());
        }
        let line = format!(
            "{what} {} / {}{}",
            bytes(done),
            bytes(total),
            if whole { " done" } else { "" }
        );
        self.tty_update(&[], |s| {
            if let Some(v) = s.running.get_mut(&id) {
                match v.tail.iter_mut().find(|l| l.starts_with(what)) {
                    Some(l) => *l = line.clone(),
                    None => {
                        if v.tail.len() == TTY_TAIL_LINES {
                            v.tail.pop_front();
                        }
                        v.tail.push_back(line.clone());
                    }
                }
            }
        });
        self.emit(
            || format!("#{id} {line}"),
            || json!({"vertex": id, "transfer": what, "current": done, "total": total}),
            || {
                let now = now_rfc3339();
                let mut status = json!({
                    "id": what,
                    "vertex": self.vertex_digest(id),
                    "name": what,
                    "current": done,
                    "total": total,
                    "timestamp": now,
                });
                if whole {
                    status["completed"] = now.into();
                }
                Some(json!({"statuses": [status]}))
            },
        );
    }

    pub fn done(&self, id: usize, secs: f64) {
        self.finish_vertex(id, format!("#{id} DONE {secs:.1}s"));
        self.emit(
            || format!("#{id} DONE {secs:.1}s"),
            || json!({"vertex": id, "completed": now_rfc3339()}),
            || Some(self.solve_vertex(id, None, json!({"completed": now_rfc3339()}))),
        );
    }

    pub fn error(&self, id: usize, message: &str) {
        self.finish_vertex(id, format!("#{id} ERROR: {message}"));
        self.emit(
            || format!("#{id} ERROR: {message}"),
            || json!({"vertex": id, "error": message, "completed": now_rfc3339()}),
            || {
                let end = json!({"error": message, "completed": now_rfc3339()});
                Some(self.solve_vertex(id, None, end))
            },
        );
    }

    pub fn summary(&self, text: &str) {
        self.tty_update(&[text.to_string()], |s| {
            s.running.clear();
            s.finished = true;
        });
        // rawjson has no summary lines; a warning is a SolveStatus warning
        self.emit(
            || text.to_string(),
            || json!({"summary": text}),
            || {
                let short = text.strip_prefix("WARNING: ")?;
                let short = redact(short, &self.redact);
                let short = base64::engine::general_purpose::STANDARD.encode(short);
                Some(json!({"warnings": [{"level": 1, "short": short}]}))
            },
        );
    }

    /// Prints a finished vertex once, as permanent lines: its name, its last
    /// output lines, then the DONE or ERROR line.
    fn finish_vertex(&self, id: usize, last: String) {
        let mut lines = Vec::new();
        {
            let mut state = self.tty.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(v) = state.running.remove(&id) {
                lines.push(format!("#{id} {}", v.name));
                lines.extend(v.tail.iter().map(|t| format!("#{id} {t}")));
            }
        }
        lines.push(last);
        self.tty_update(&lines, |_| {});
    }
}

fn terminal_width() -> usize {
    std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(80)
}

/// Erases the live frame, prints `permanent`, then draws the frame again
/// (unless the build is over). Everything written passes through `redact`.
fn draw(
    out: &mut dyn Write,
    state: &mut TtyState,
    permanent: &[String],
    start: Instant,
    secrets: &[String],
) {
    let mut buf = String::new();
    if state.drawn > 0 {
        // cursor up to the first line of the old frame, erase to the end
        buf.push_str(&format!("\x1b[{}A\r\x1b[J", state.drawn));
    }
    for line in permanent {
        buf.push_str(&redact(line, secrets));
        buf.push('\n');
    }
    state.drawn = 0;
    if !state.finished {
        let now = Instant::now();
        let running: Vec<RunningVertex> = state
            .running
            .iter()
            .map(|(id, v)| RunningVertex {
                id: *id,
                name: v.name.clone(),
                elapsed_secs: now.duration_since(v.start).as_secs_f64(),
                tail: v.tail.iter().cloned().collect(),
            })
            .collect();
        let frame = render_frame(
            &running,
            now.duration_since(start).as_secs_f64(),
            terminal_width(),
        );
        for line in &frame {
            buf.push_str(&redact(line, secrets));
            buf.push('\n');
        }
        state.drawn = frame.len();
    }
    let _ = out.write_all(buf.as_bytes());
    let _ = out.flush();
}

fn ticker(
    out: Weak<Mutex<Box<dyn Write + Send>>>,
    tty: Weak<Mutex<TtyState>>,
    start: Instant,
    secrets: Vec<String>,
) {
    loop {
        std::thread::sleep(TTY_TICK);
        let (Some(out), Some(tty)) = (out.upgrade(), tty.upgrade()) else {
            return;
        };
        let mut state = tty.lock().unwrap_or_else(|e| e.into_inner());
        if state.finished {
            return;
        }
        let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
        draw(&mut **out, &mut state, &[], start, &secrets);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(Mode::parse("auto", false), Ok(Mode::Plain));
        assert_eq!(Mode::parse("auto", true), Ok(Mode::Tty));
        assert_eq!(Mode::parse("tty", false), Ok(Mode::Tty));
        assert_eq!(Mode::parse("plain", true), Ok(Mode::Plain));
        assert!(Mode::parse("fancy", false).unwrap_err().contains("fancy"));
    }

    #[test]
    fn frame_shows_running_vertices_with_timer_and_tail() {
        let running = vec![
            RunningVertex {
                id: 2,
                name: "[1/2] RUN make".into(),
                elapsed_secs: 1.25,
                tail: vec!["cc a.c".into(), "cc b.c".into()],
            },
            RunningVertex {
                id: 3,
                name: "[2/2] COPY . /src".into(),
                elapsed_secs: 0.0,
                tail: vec![],
            },
        ];
        assert_eq!(
            render_frame(&running, 3.04, 80),
            vec![
                "[+] Building 3.0s (2 running)",
                "#2 [1/2] RUN make 1.2s",
                "#2 cc a.c",
                "#2 cc b.c",
                "#3 [2/2] COPY . /src 0.0s",
            ]
        );
        assert_eq!(render_frame(&running, 3.0, 20)[1], "#2 [1/2] RUN make 1.");
    }

    /// A writer the test can read back after Progress is done with it.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn tty_prints_finished_vertices_once_and_redacts() {
        let buf = Shared::default();
        let p = Progress::new(Mode::Tty, Box::new(buf.clone()), vec!["s3cret".into()]);
        p.started(1, "[1/2] RUN echo s3cret");
        p.log(1, 1, "token=s3cret");
        p.done(1, 1.23);
        p.cached(2, "[2/2] COPY a b");
        p.started(3, "[3/3] RUN false");
        p.error(3, "exit 1");
        p.summary("built in 2.0s");
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("#1 token=****\n#1 DONE 1.2s\n"), "{text}");
        assert_eq!(text.matches("#1 DONE 1.2s").count(), 1, "{text}");
        assert!(text.contains("#2 [2/2] COPY a b\n#2 CACHED\n"), "{text}");
        assert!(text.contains("#3 ERROR: exit 1\n"), "{text}");
        assert!(text.ends_with("built in 2.0s\n"), "{text}");
    }

    #[test]
    fn transfers_are_reported_at_start_while_throttled_and_when_whole() {
        let buf = Shared::default();
        let p = Progress::new(Mode::Plain, Box::new(buf.clone()), vec![]);
        p.transfer(1, "sha256:abc", 1_000_000, 4_000_000);
        p.transfer(1, "sha256:abc", 2_000_000, 4_000_000);
        p.transfer(1, "sha256:abc", 4_000_000, 4_000_000);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text,
            "#1 sha256:abc 1.0 MB / 4.0 MB\n#1 sha256:abc 4.0 MB / 4.0 MB done\n"
        );
    }

    #[test]
    fn plain_is_unchanged() {
        let buf = Shared::default();
        let p = Progress::new(Mode::Plain, Box::new(buf.clone()), vec![]);
        p.started(1, "a");
        p.cached(2, "b");
        p.done(1, 0.5);
        p.error(3, "x");
        p.summary("s");
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text,
            "#1 a\n#2 b\n#2 CACHED\n#1 DONE 0.5s\n#3 ERROR: x\ns\n"
        );
    }

    #[test]
    fn rawjson_is_buildkit_s_solve_status() {
        let buf = Shared::default();
        let p = Progress::new(Mode::RawJson, Box::new(buf.clone()), vec!["s3cret".into()]);
        p.started(1, "[1/2] RUN make");
        p.log(1, 1, "token=s3cret");
        p.phase(1, "layer diff 1.0 MB", Instant::now());
        p.done(1, 1.0);
        p.cached(2, "[2/2] COPY a b");
        p.error(3, "exit 1");
        p.summary("WARNING: Dockerfile:1: s3cret");
        p.summary("built sha256:x in 1.0s");
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        // started, log, status, done, cached, error, warning; no summary
        assert_eq!(lines.len(), 7, "{text}");
        let started = &lines[0]["vertexes"][0];
        let digest = started["digest"].as_str().unwrap();
        assert!(
            digest.starts_with("sha256:") && digest.len() == 71,
            "{digest}"
        );
        assert_eq!(started["name"], "[1/2] RUN make");
        assert!(started["started"].is_string() && started.get("completed").is_none());
        let log = &lines[1]["logs"][0];
        assert_eq!(
            (log["vertex"].as_str(), log["stream"].as_u64()),
            (Some(digest), Some(1))
        );
        let data = base64::engine::general_purpose::STANDARD
            .decode(log["data"].as_str().unwrap())
            .unwrap();
        assert_eq!(data, b"token=****\n");
        assert_eq!(lines[2]["statuses"][0]["vertex"], digest);
        let done = &lines[3]["vertexes"][0];
        assert_eq!(
            (done["digest"].as_str(), &done["name"]),
            (Some(digest), &started["name"])
        );
        assert_eq!(done["started"], started["started"]);
        assert!(done["completed"].is_string());
        assert_eq!(lines[4]["vertexes"][0]["cached"], true);
        assert_eq!(lines[5]["vertexes"][0]["error"], "exit 1");
        let short = base64::engine::general_purpose::STANDARD
            .decode(lines[6]["warnings"][0]["short"].as_str().unwrap())
            .unwrap();
        assert_eq!(short, b"Dockerfile:1: ****");
        assert!(!text.contains("s3cret"));
    }
}
