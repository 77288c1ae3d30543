//! End-to-end tests of `ADD http://URL`, run as the unprivileged test user
//! against a small HTTP server on 127.0.0.1 started by each test: content,
//! mode 0600 and the Last-Modified mtime, destination forms, `--checksum`,
//! HTTP errors, and that a `--checksum` rebuild is a cache hit without the
//! server.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kiln_vm_tests::{kiln, test_dir};

const BODY: &str = "hello from the server\n";
/// Sun, 06 Nov 1994 08:49:37 GMT
const LAST_MODIFIED: i64 = 784_111_777;

/// A loopback HTTP server: `/files/hello.txt` is BODY with a Last-Modified,
/// `/old` redirects to it, anything else is a 404.
struct Server {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut request = String::new();
                let _ = reader.read_line(&mut request);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                }
                let path = request.split(' ').nth(1).unwrap_or("");
                if path == "/files/a.tar.gz" {
                    let body = tar_gz();
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = conn.write_all(head.as_bytes());
                    let _ = conn.write_all(&body);
                    continue;
                }
                let response = match path {
                    "/files/hello.txt" => format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nLast-Modified: Sun, 06 Nov 1994 08:49:37 GMT\r\nConnection: close\r\n\r\n{BODY}",
                        BODY.len()
                    ),
                    "/old" => "HTTP/1.1 301 Moved Permanently\r\nLocation: /files/hello.txt\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string(),
                    _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_string(),
                };
                let _ = conn.write_all(response.as_bytes());
            }
        });
        Server {
            port,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Server {
    /// Stop accepting and close the port: a later connection is refused.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Project {
    dir: PathBuf,
}

impl Project {
    fn new(name: &str, dockerfile: &str) -> Project {
        let dir = test_dir(name);
        std::fs::create_dir_all(dir.join("ctx")).unwrap();
        std::fs::write(dir.join("ctx/Dockerfile"), dockerfile).unwrap();
        kiln_vm_tests::give_to_test_user(&dir);
        Project { dir }
    }

    fn build(&self, out: &str) -> Output {
        self.build_with(out, &[])
    }

    /// [`Project::build`] with `extra` flags.
    fn build_with(&self, out: &str, extra: &[String]) -> Output {
        self.build_env(out, extra, &[])
    }

    /// [`Project::build_with`] with environment variables `env` (K=V; the
    /// test user's kiln gets a clean environment, so through env(1)).
    fn build_env(&self, out: &str, extra: &[String], env: &[String]) -> Output {
        let dest = self.dir.join(out);
        let mut args = vec![
            "--root".to_string(),
            self.dir.join("state").display().to_string(),
            "build".into(),
            // the server is on the host's loopback, which a `sandbox`
            // download cannot reach (tests/network.rs checks that)
            "--network".into(),
            "host".into(),
            "--allow".into(),
            "network.host".into(),
            "--progress".into(),
            "plain".into(),
            "-o".into(),
            format!("type=local,dest={}", dest.display()),
        ];
        args.extend(extra.iter().cloned());
        args.push(self.dir.join("ctx").display().to_string());
        if env.is_empty() {
            return kiln(args).output().expect("run kiln build");
        }
        let mut cmd = kiln_vm_tests::unprivileged(Path::new("/usr/bin/env"));
        cmd.args(env);
        cmd.arg(kiln_vm_tests::stage_file(&kiln_vm_tests::kiln_binary()));
        cmd.args(args);
        cmd.output().expect("run kiln build")
    }
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "kiln build failed:\n{err}");
    err
}

fn failed(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "kiln build should have failed:\n{err}");
    err
}

/// `sha256sum` of BODY.
fn digest() -> String {
    "sha256:401427ad2e655c65a931a770602842977762844af15ff9bd5da557910393a742".to_string()
}

fn check_file(p: &Path, mode: u32) {
    let meta = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert_eq!(std::fs::read_to_string(p).unwrap(), BODY, "{}", p.display());
    assert_eq!(meta.mode() & 0o7777, mode, "{}", p.display());
    assert_eq!(meta.mtime(), LAST_MODIFIED, "{}", p.display());
}

#[test]
fn add_url_lands_with_mode_0600_and_last_modified() {
    let s = Server::start();
    let url = s.url("/files/hello.txt");
    let p = Project::new(
        "add-url-forms",
        &format!(
            "FROM scratch\nADD {url} /named\nADD {url} /dir/\nADD {old} /redirected\nADD --chmod=0644 {url} /chmod\nADD --checksum={sum} {url} /checked\n",
            old = s.url("/old"),
            sum = digest()
        ),
    );
    ok(&p.build("out"));
    let out = p.dir.join("out");
    check_file(&out.join("named"), 0o600);
    check_file(&out.join("dir/hello.txt"), 0o600);
    check_file(&out.join("redirected"), 0o600);
    check_file(&out.join("chmod"), 0o644);
    check_file(&out.join("checked"), 0o600);
}

#[test]
fn add_url_checksum_mismatch_fails_and_names_both_digests() {
    let s = Server::start();
    let url = s.url("/files/hello.txt");
    let wrong = format!("sha256:{}", "0".repeat(64));
    let p = Project::new(
        "add-url-mismatch",
        &format!("FROM scratch\nADD --checksum={wrong} {url} /f\n"),
    );
    let err = failed(&p.build("out"));
    assert!(err.contains(&url), "names the URL: {err}");
    assert!(err.contains(&wrong), "names the expected digest: {err}");
    assert!(err.contains(&digest()), "names the actual digest: {err}");
    assert!(!p.dir.join("out/f").exists(), "nothing is added");
}

#[test]
fn add_url_404_names_the_url_and_status() {
    let s = Server::start();
    let url = s.url("/missing.txt");
    let p = Project::new("add-url-404", &format!("FROM scratch\nADD {url} /f\n"));
    let err = failed(&p.build("out"));
    assert!(err.contains(&url), "names the URL: {err}");
    assert!(err.contains("404"), "names the status: {err}");
}

#[test]
fn add_url_with_checksum_is_a_cache_hit_without_the_server() {
    let s = Server::start();
    let url = s.url("/files/hello.txt");
    let p = Project::new(
        "add-url-cache",
        &format!("FROM scratch\nADD --checksum={} {url} /f\n", digest()),
    );
    ok(&p.build("first"));
    check_file(&p.dir.join("first/f"), 0o600);
    drop(s);
    // The server is gone: only a cache hit can build this.
    let err = ok(&p.build("second"));
    assert!(err.contains("CACHED"), "{err}");
    check_file(&p.dir.join("second/f"), 0o600);
}

#[test]
fn add_url_chown_sets_the_owner() {
    let s = Server::start();
    let url = s.url("/files/hello.txt");
    let p = Project::new(
        "add-url-chown",
        &format!("FROM scratch\nADD --chown=7:8 {url} /owned\nADD {url} /root-owned\n"),
    );
    let tar = p.dir.join("out.tar");
    let o = kiln([
        "--root".to_string(),
        p.dir.join("state").display().to_string(),
        "build".into(),
        "--network".into(),
        "host".into(),
        "--allow".into(),
        "network.host".into(),
        "-o".into(),
        format!("type=tar,dest={}", tar.display()),
        p.dir.join("ctx").display().to_string(),
    ])
    .output()
    .expect("run kiln build");
    ok(&o);
    let out = kiln_vm_tests::run_checked(
        std::process::Command::new("tar")
            .arg("--numeric-owner")
            .arg("-tvf")
            .arg(&tar),
    );
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = |name: &str| {
        listing
            .lines()
            .find(|l| {
                l.split_whitespace()
                    .last()
                    .is_some_and(|n| n.trim_start_matches("./") == name)
            })
            .unwrap_or_else(|| panic!("{name} missing from {listing}"))
            .to_string()
    };
    assert!(line("owned").starts_with("-rw------- 7/8 "), "{listing}");
    assert!(
        line("root-owned").starts_with("-rw------- 0/0 "),
        "{listing}"
    );
}

/// A gzipped tar holding `dir/inner.txt` (mode 0640, owner 5:6).
fn tar_gz() -> Vec<u8> {
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::default(),
    ));
    let data = b"inside the archive\n";
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o640);
    h.set_uid(5);
    h.set_gid(6);
    h.set_cksum();
    b.append_data(&mut h, "dir/inner.txt", &data[..]).unwrap();
    b.into_inner().unwrap().finish().unwrap()
}

#[test]
fn add_url_unpack_extracts_an_archive_and_copies_anything_else() {
    let s = Server::start();
    let archive = s.url("/files/a.tar.gz");
    let plain = s.url("/files/hello.txt");
    let p = Project::new(
        "add-url-unpack",
        &format!(
            "FROM scratch\nADD --unpack=true {archive} /d/\nADD --unpack=true {plain} /p/\nADD {archive} /kept/\n"
        ),
    );
    ok(&p.build("out"));
    let out = p.dir.join("out");
    assert_eq!(
        std::fs::read_to_string(out.join("d/dir/inner.txt")).unwrap(),
        "inside the archive\n"
    );
    let mode = std::fs::metadata(out.join("d/dir/inner.txt"))
        .unwrap()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o640);
    assert!(!out.join("d/a.tar.gz").exists());
    assert_eq!(
        std::fs::read_to_string(out.join("p/hello.txt")).unwrap(),
        BODY
    );
    // without --unpack a downloaded archive stays as it is, as BuildKit
    assert_eq!(std::fs::read(out.join("kept/a.tar.gz")).unwrap(), tar_gz());
}

#[test]
fn build_contexts_from_urls_are_fetched_and_give_their_time() {
    let s = Server::start();
    let p = Project::new(
        "named-context-url",
        "ARG SOURCE_DATE_EPOCH=one\nFROM scratch\nCOPY --from=arch dir/inner.txt /a\nCOPY --from=one hello.txt /h\n",
    );
    let o = p.build_with(
        "out",
        &[
            "--build-context".into(),
            format!("arch={}", s.url("/files/a.tar.gz")),
            "--build-context".into(),
            format!("one={}", s.url("/files/hello.txt")),
        ],
    );
    ok(&o);
    let out = p.dir.join("out");
    // an archive is its files; a single file is a context holding it
    assert_eq!(
        std::fs::read_to_string(out.join("a")).unwrap(),
        "inside the archive\n"
    );
    assert_eq!(std::fs::read_to_string(out.join("h")).unwrap(), BODY);
    // SOURCE_DATE_EPOCH naming the context took its Last-Modified
    for f in ["a", "h"] {
        let m = std::fs::symlink_metadata(out.join(f)).unwrap().mtime();
        assert!(
            m <= LAST_MODIFIED,
            "{f} mtime {m} not clamped to {LAST_MODIFIED}"
        );
    }
    let missing = p.build_with(
        "out2",
        &[
            "--build-context".into(),
            format!("arch={}", s.url("/files/missing.tar")),
        ],
    );
    let err = failed(&missing);
    assert!(
        err.contains("--build-context arch=") && err.contains("404"),
        "{err}"
    );
}

#[test]
fn a_source_policy_converts_and_denies_sources() {
    let s = Server::start();
    let p = Project::new(
        "source-policy",
        &format!("FROM scratch\nADD {} /hello\n", s.url("/moved/hello.txt")),
    );
    let policy = p.dir.join("policy.json");
    let port = s.port;
    std::fs::write(
        &policy,
        format!(
            r#"{{"rules":[
  {{"action":"DENY","selector":{{"identifier":"docker-image://*"}}}},
  {{"action":"CONVERT","selector":{{"identifier":"http://127.0.0.1:{port}/moved/*"}},
    "updates":{{"identifier":"http://127.0.0.1:{port}/files/$1","attrs":{{"http.checksum":"{sum}"}}}}}}
]}}"#,
            sum = digest()
        ),
    )
    .unwrap();
    kiln_vm_tests::give_to_test_user(&p.dir);
    let env = [format!(
        "EXPERIMENTAL_BUILDKIT_SOURCE_POLICY={}",
        policy.display()
    )];
    let build = |dockerfile: &str| {
        std::fs::write(p.dir.join("ctx/Dockerfile"), dockerfile).unwrap();
        kiln_vm_tests::give_to_test_user(&p.dir);
        p.build_env("out", &[], &env)
    };
    // the URL is read where the policy sends it, checked against the
    // checksum the policy gives
    let dockerfile = std::fs::read_to_string(p.dir.join("ctx/Dockerfile")).unwrap();
    ok(&build(&dockerfile));
    assert_eq!(
        std::fs::read_to_string(p.dir.join("out/hello")).unwrap(),
        BODY
    );
    // every image is denied
    let err = failed(&build("FROM busybox\n"));
    assert!(
        err.contains("source \"docker-image://docker.io/library/busybox:latest\" denied by policy"),
        "{err}"
    );
    // a policy that does not parse is an error naming the file
    std::fs::write(
        &policy,
        r#"{"rules":[{"action":"MAYBE","selector":{"identifier":"x"}}]}"#,
    )
    .unwrap();
    let err = failed(&build(&dockerfile));
    assert!(
        err.contains("policy.json") && err.contains("MAYBE"),
        "{err}"
    );
}
