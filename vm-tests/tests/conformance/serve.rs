//! The HTTP server a case's builds reach at `$HTTP` (127.0.0.1, a port
//! of its own): the case's `[[case.serve]]` files, and its git
//! repositories (`[[case.repo]]`) at `$HTTP/git/NAME.git` through
//! `git http-backend`, as BuildKit's tests serve theirs.

use super::case::{Repo, Served};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub struct Server {
    pub url: String,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.url.trim_start_matches("http://"));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Make the case's git repositories under `dir/repos` (each script run
/// by `sh -e` in a fresh repository) and start the server.
pub fn start(files: &[Served], repos: &[Repo], dir: &Path) -> Result<Server, String> {
    let repo_root = dir.join("repos");
    for r in repos {
        let path = repo_root.join(format!("{}.git", r.name));
        std::fs::create_dir_all(&path).map_err(|e| e.to_string())?;
        let out = Command::new("sh")
            .arg("-ec")
            .arg(format!(
                "git init -q -b {} . && git config user.name kiln && git config user.email kiln@example.invalid && {}",
                r.branch.as_deref().unwrap_or("master"),
                r.script
            ))
            .current_dir(&path)
            .env("GIT_AUTHOR_DATE", "2024-01-01T00:00:00Z")
            .env("GIT_COMMITTER_DATE", "2024-01-01T00:00:00Z")
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "repo {}: {}",
                r.name,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        // served as a bare repository would be
        let _ = Command::new("git")
            .args(["update-server-info"])
            .current_dir(&path)
            .status();
    }
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let (flag, files) = (stop.clone(), files.to_vec());
    let thread = std::thread::spawn(move || {
        for conn in listener.incoming() {
            if flag.load(Ordering::SeqCst) {
                break;
            }
            let Ok(conn) = conn else { continue };
            let _ = handle(conn, &files, &repo_root);
        }
    });
    Ok(Server {
        url,
        stop,
        thread: Some(thread),
    })
}

fn handle(mut conn: TcpStream, files: &[Served], repo_root: &Path) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.trim_end().split_once(':') {
            headers.insert(k.to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut parts = request.split(' ');
    let method = parts.next().unwrap_or("GET").to_string();
    let target = parts.next().unwrap_or("/").to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    if let Some(rest) = path.strip_prefix("/git/") {
        return git_backend(&mut conn, &method, rest, query, &headers, &body, repo_root);
    }
    let Some(f) = files.iter().find(|f| f.path == path) else {
        return conn.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    };
    let data: Vec<u8> = match (&f.data, &f.base64) {
        (_, Some(b)) => decode_base64(b),
        (Some(d), None) => d.clone().into_bytes(),
        (None, None) => Vec::new(),
    };
    let mut head = format!(
        "HTTP/1.1 {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        f.status.as_deref().unwrap_or("200 OK"),
        data.len()
    );
    for h in &f.headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes())?;
    if method != "HEAD" {
        conn.write_all(&data)?;
    }
    Ok(())
}

fn git_backend(
    conn: &mut TcpStream,
    method: &str,
    path: &str,
    query: &str,
    headers: &HashMap<String, String>,
    body: &[u8],
    repo_root: &Path,
) -> std::io::Result<()> {
    let mut cmd = Command::new("git");
    // the repositories belong to the test user; the backend runs as root
    cmd.args(["-c", "safe.directory=*", "http-backend"])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", repo_root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", format!("/{path}"))
        .env("QUERY_STRING", query)
        .env("REQUEST_METHOD", method)
        .env("CONTENT_LENGTH", body.len().to_string())
        .env(
            "CONTENT_TYPE",
            headers.get("content-type").cloned().unwrap_or_default(),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(p) = headers.get("git-protocol") {
        cmd.env("GIT_PROTOCOL", p);
    }
    let mut child = cmd.spawn()?;
    child.stdin.take().unwrap().write_all(body)?;
    let out = child.wait_with_output()?;
    // a CGI response: headers, a blank line, the body
    let split = out
        .stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| (p, p + 4))
        .or_else(|| {
            out.stdout
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|p| (p, p + 2))
        })
        .unwrap_or((0, 0));
    let head = String::from_utf8_lossy(&out.stdout[..split.0]).into_owned();
    let data = &out.stdout[split.1..];
    let mut status = "200 OK".to_string();
    let mut resp = String::new();
    for line in head.lines() {
        if let Some(s) = line.strip_prefix("Status:") {
            status = s.trim().to_string();
        } else if !line.is_empty() {
            resp.push_str(line.trim_end());
            resp.push_str("\r\n");
        }
    }
    conn.write_all(
        format!(
            "HTTP/1.1 {status}\r\n{resp}Content-Length: {}\r\nConnection: close\r\n\r\n",
            data.len()
        )
        .as_bytes(),
    )?;
    conn.write_all(data)
}

fn decode_base64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s.split_whitespace().collect::<String>())
        .expect("base64 data")
}
