//! End-to-end tests of `kiln push`, `pull`, `login`, `build --push` and
//! `FROM` pulls against a real registry: Debian's `docker-registry` (the
//! CNCF distribution server) started here as the unprivileged test user on
//! a free loopback port, over plain HTTP and over TLS with a private CA and
//! htpasswd auth. skopeo and curl are the oracles that read kiln's pushes
//! back; the registry's storage directory is corrupted by hand to check
//! that a bad blob never reaches kiln's store.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use kiln_vm_tests::{busybox_rootfs, kiln_binary, run_checked, stage_file, test_dir, unprivileged};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn chown_to_test_user(path: &Path) {
    kiln_vm_tests::give_to_test_user(path);
}

/// `kiln --root STATE ARGS...` as the test user, with `env` set (through
/// /usr/bin/env: as root, `unprivileged` starts from a clean environment).
fn kiln_env(env: &[(&str, String)], state: &Path, args: &[&str]) -> Command {
    let mut cmd = unprivileged(Path::new("/usr/bin/env"));
    for (k, v) in env {
        cmd.arg(format!("{k}={v}"));
    }
    cmd.arg(stage_file(&kiln_binary()))
        .args(["--root", p(state)])
        .args(args);
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run kiln")
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn fails(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        !out.status.success(),
        "{cmd:?} should have failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stderr)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// A docker-registry process, killed on drop.
struct Registry {
    child: Child,
    port: u16,
    storage: PathBuf,
}

impl Registry {
    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Start one in `dir`: plain HTTP, or TLS + htpasswd with `tls`.
    fn start(dir: &Path, tls: Option<&TlsSetup>) -> Registry {
        let port = free_port();
        let storage = dir.join("registry-data");
        fs::create_dir_all(&storage).unwrap();
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            p(&storage)
        );
        if let Some(t) = tls {
            yaml.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\nauth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
                p(&t.cert),
                p(&t.key),
                p(&t.htpasswd)
            ));
        }
        let config = dir.join("registry.yml");
        fs::write(&config, yaml).unwrap();
        chown_to_test_user(dir);
        let child = kiln_vm_tests::spawn_registry(&config, port);
        Registry {
            child,
            port,
            storage,
        }
    }

    /// The file the registry keeps blob `digest` in.
    /// Put `bytes` in the registry's storage as the manifest `repo:tag`
    /// names, bypassing its API (which refuses what a hostile registry
    /// would serve).
    fn store_manifest(&self, repo: &str, tag: &str, bytes: &[u8], scratch: &Path) {
        let digest = sha256_of(bytes, scratch);
        let data = self.blob_file(&digest);
        fs::create_dir_all(data.parent().unwrap()).unwrap();
        fs::write(&data, bytes).unwrap();
        let manifests = self
            .storage
            .join("docker/registry/v2/repositories")
            .join(repo)
            .join("_manifests");
        let hex = digest.strip_prefix("sha256:").unwrap();
        for link in [
            manifests.join("revisions/sha256").join(hex).join("link"),
            manifests.join("tags").join(tag).join("current/link"),
        ] {
            fs::create_dir_all(link.parent().unwrap()).unwrap();
            fs::write(&link, &digest).unwrap();
        }
    }

    fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA, a server certificate for 127.0.0.1 signed by it, and an htpasswd
/// file with user `kiln` / password `s3cret`.
struct TlsSetup {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    htpasswd: PathBuf,
}

fn tls_setup(dir: &Path) -> TlsSetup {
    let t = TlsSetup {
        ca: dir.join("ca.crt"),
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
        htpasswd: dir.join("htpasswd"),
    };
    let ca_key = dir.join("ca.key");
    run_checked(Command::new("openssl").args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=kiln test CA",
        "-keyout",
        p(&ca_key),
        "-out",
        p(&t.ca),
    ]));
    let csr = dir.join("server.csr");
    run_checked(Command::new("openssl").args([
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        p(&t.key),
        "-out",
        p(&csr),
    ]));
    let ext = dir.join("san.ext");
    fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run_checked(Command::new("openssl").args([
        "x509",
        "-req",
        "-in",
        p(&csr),
        "-CA",
        p(&t.ca),
        "-CAkey",
        p(&ca_key),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        p(&ext),
        "-out",
        p(&t.cert),
    ]));
    let out = run_checked(Command::new("htpasswd").args(["-Bbn", "kiln", "s3cret"]));
    fs::write(&t.htpasswd, &out.stdout).unwrap();
    for f in [&t.key, &ca_key] {
        fs::set_permissions(f, fs::Permissions::from_mode(0o644)).unwrap();
    }
    t
}

/// A state directory holding `localhost/bb` (a busybox rootfs, imported)
/// and a build of it with ENV and CMD; returns the rootfs's parent dir.
fn import_busybox(dir: &Path, state: &Path) {
    let rootfs = dir.join("rootfs");
    busybox_rootfs(&rootfs);
    fs::write(rootfs.join("etc/kiln-marker"), "pushed by kiln\n").unwrap();
    chown_to_test_user(&rootfs);
    ok(&mut kiln_env(
        &[],
        state,
        &["import", p(&rootfs), "-t", "localhost/bb"],
    ));
}

fn context(dir: &Path, name: &str, dockerfile: &str) -> PathBuf {
    let ctx = dir.join(name);
    fs::create_dir_all(&ctx).unwrap();
    fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
    chown_to_test_user(&ctx);
    ctx
}

/// Every blob file in a state directory's content store.
fn blobs(state: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![state.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.parent().is_some_and(|p| p.ends_with("blobs/sha256")) {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

fn sha256_of(bytes: &[u8], dir: &Path) -> String {
    let f = dir.join("sha-input");
    fs::write(&f, bytes).unwrap();
    let out = run_checked(Command::new("sha256sum").arg(&f));
    format!("sha256:{}", &text(&out.stdout)[..64])
}

fn curl(args: &[&str]) -> Vec<u8> {
    run_checked(Command::new("curl").arg("-sSf").args(args)).stdout
}

fn image_id_of(listing: &str, repo: &str) -> String {
    listing
        .lines()
        .find(|l| l.starts_with(repo))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or_else(|| panic!("{repo} not in:\n{listing}"))
        .to_string()
}

#[test]
fn push_then_pull_on_fresh_state_skopeo_reads_it_and_from_pulls_it() {
    let dir = test_dir("registry-roundtrip");
    let reg = Registry::start(&dir.join("reg"), None);
    let host = reg.host();
    let insecure = format!("--insecure-registry={host}");
    let state = dir.join("state");
    import_busybox(&dir, &state);
    let ctx = context(
        &dir,
        "ctx",
        "FROM localhost/bb\nENV GREETING=hello-from-kiln\nCMD [\"sh\", \"-c\", \"echo $GREETING\"]\n",
    );
    let name = format!("{host}/x:tag");
    // kiln build --push -t REF
    let out = ok(&mut kiln_env(
        &[],
        &state,
        &[
            "build",
            "--progress",
            "plain",
            &insecure,
            "--push",
            "-t",
            &name,
            p(&ctx),
        ],
    ));
    let manifest_digest = out.trim().lines().last().unwrap().to_string();
    assert!(manifest_digest.starts_with("sha256:"), "{out}");
    let src_id = image_id_of(
        &ok(&mut kiln_env(&[], &state, &["images"])),
        &format!("{host}/x"),
    );

    // the registry serves the manifest under the tag, byte for byte
    let raw = curl(&[
        "-H",
        "Accept: application/vnd.oci.image.manifest.v1+json",
        &format!("http://{host}/v2/x/manifests/tag"),
    ]);
    assert_eq!(sha256_of(&raw, &dir), manifest_digest);

    // kiln push to another repository of the same registry mounts the blobs
    let push = run(&mut kiln_env(
        &[],
        &state,
        &["push", &insecure, &name, &format!("{host}/y:v1")],
    ));
    assert!(push.status.success(), "{}", text(&push.stderr));
    let msg = text(&push.stderr);
    assert!(
        msg.contains("0 blobs uploaded, 2 mounted"),
        "expected cross-repository mounts: {msg}"
    );
    // pushing again uploads nothing
    let again = run(&mut kiln_env(&[], &state, &["push", &insecure, &name]));
    assert!(
        text(&again.stderr).contains("0 blobs uploaded, 0 mounted, 2 already there"),
        "{}",
        text(&again.stderr)
    );

    // skopeo reads what kiln pushed, config included
    let layout = dir.join("skopeo-layout");
    run_checked(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{name}"),
        &format!("oci:{}:copied", p(&layout)),
    ]));
    let inspect = text(
        &run_checked(Command::new("skopeo").args([
            "inspect",
            "--tls-verify=false",
            &format!("docker://{name}"),
        ]))
        .stdout,
    );
    assert!(inspect.contains("GREETING=hello-from-kiln"), "{inspect}");
    let config = text(
        &run_checked(Command::new("skopeo").args([
            "inspect",
            "--config",
            "--tls-verify=false",
            &format!("docker://{name}"),
        ]))
        .stdout,
    );
    assert!(
        config.contains("\"Cmd\"") && config.contains("echo $GREETING"),
        "{config}"
    );

    // a fresh state directory pulls the same manifest and config
    let fresh = dir.join("fresh");
    let pulled = ok(&mut kiln_env(&[], &fresh, &["pull", &insecure, &name]));
    assert_eq!(pulled.trim(), manifest_digest);
    let listing = ok(&mut kiln_env(&[], &fresh, &["images"]));
    assert_eq!(image_id_of(&listing, &format!("{host}/x")), src_id);
    // blobs shared with what is stored are not fetched twice, and a name
    // pinned by digest that is stored needs no registry at all
    let before = blobs(&fresh);
    drop(reg);
    let pinned = format!("{host}/x@{manifest_digest}");
    ok(&mut kiln_env(&[], &fresh, &["pull", &insecure, &pinned]));
    assert_eq!(blobs(&fresh), before);

    // FROM a registry image on a fresh state directory pulls it
    let reg = Registry::start(&dir.join("reg"), None);
    let host2 = reg.host();
    let insecure2 = format!("--insecure-registry={host2}");
    let state_a = dir.join("state-a");
    import_busybox(&dir, &state_a);
    let ctx_a = context(&dir, "ctx-a", "FROM localhost/bb\nENV FROM_REGISTRY=yes\n");
    ok(&mut kiln_env(
        &[],
        &state_a,
        &[
            "build",
            "--progress",
            "plain",
            &insecure2,
            "--push",
            "-t",
            &format!("{host2}/base:1"),
            p(&ctx_a),
        ],
    ));
    let ctx_b = context(
        &dir,
        "ctx-b",
        &format!("FROM {host2}/base:1\nRUN cat /etc/kiln-marker > /copied && echo $FROM_REGISTRY >> /copied\n"),
    );
    let state_b = dir.join("state-b");
    ok(&mut kiln_env(
        &[],
        &state_b,
        &[
            "build",
            "--progress",
            "plain",
            &insecure2,
            "-t",
            "localhost/child",
            p(&ctx_b),
        ],
    ));
    let copied = ok(&mut kiln_env(
        &[],
        &state_b,
        &["run", "localhost/child", "--", "cat", "/copied"],
    ));
    assert_eq!(copied, "pushed by kiln\nyes\n");
    let listing = ok(&mut kiln_env(&[], &state_b, &["images"]));
    assert!(listing.contains(&format!("{host2}/base")), "{listing}");
}

/// The host platform in OCI terms (`amd64`, `arm64`), as kiln writes it.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

#[test]
fn index_pulls_the_requested_platform_and_names_the_available_ones() {
    let dir = test_dir("registry-index");
    let reg = Registry::start(&dir.join("reg"), None);
    let host = reg.host();
    let insecure = format!("--insecure-registry={host}");
    let state = dir.join("state");
    import_busybox(&dir, &state);
    // two images, pushed by tag into one repository
    let mut digests = Vec::new();
    for (tag, value) in [("a", "host-one"), ("b", "other-one")] {
        let ctx = context(
            &dir,
            &format!("ctx-{tag}"),
            &format!("FROM localhost/bb\nENV WHICH={value}\n"),
        );
        let out = ok(&mut kiln_env(
            &[],
            &state,
            &[
                "build",
                "--progress",
                "plain",
                &insecure,
                "--push",
                "-t",
                &format!("{host}/multi:{tag}"),
                p(&ctx),
            ],
        ));
        let digest = out.trim().lines().last().unwrap().to_string();
        let raw = curl(&[
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
            &format!("http://{host}/v2/multi/manifests/{digest}"),
        ]);
        digests.push((digest, raw.len()));
    }
    let other_arch = if host_arch() == "arm64" {
        "s390x"
    } else {
        "arm64"
    };
    let entry = |(d, size): &(String, usize), arch: &str| {
        format!(
            r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{d}","size":{size},"platform":{{"architecture":"{arch}","os":"linux"}}}}"#
        )
    };
    let put_index = |tag: &str, entries: Vec<String>| {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{}]}}"#,
            entries.join(",")
        );
        let file = dir.join(format!("index-{tag}.json"));
        fs::write(&file, body).unwrap();
        curl(&[
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/vnd.oci.image.index.v1+json",
            "--data-binary",
            &format!("@{}", p(&file)),
            &format!("http://{host}/v2/multi/manifests/{tag}"),
        ]);
    };
    put_index(
        "both",
        vec![
            entry(&digests[1], other_arch),
            entry(&digests[0], host_arch()),
        ],
    );
    put_index(
        "foreign",
        vec![
            entry(&digests[1], other_arch),
            entry(&digests[0], "riscv64"),
        ],
    );

    // the host's platform by default
    let fresh = dir.join("fresh");
    ok(&mut kiln_env(
        &[],
        &fresh,
        &["pull", &insecure, &format!("{host}/multi:both")],
    ));
    let config = ok(&mut kiln_env(
        &[],
        &fresh,
        &[
            "run",
            &format!("{host}/multi:both"),
            "--",
            "sh",
            "-c",
            "echo WHICH=$WHICH",
        ],
    ));
    assert!(config.contains("WHICH=host-one"), "{config}");

    // --platform picks another entry
    let fresh2 = dir.join("fresh2");
    ok(&mut kiln_env(
        &[],
        &fresh2,
        &[
            "pull",
            &insecure,
            "--platform",
            &format!("linux/{other_arch}"),
            &format!("{host}/multi:both"),
        ],
    ));
    let listing = ok(&mut kiln_env(&[], &fresh2, &["images"]));
    assert!(listing.contains(&format!("{host}/multi")), "{listing}");

    // an index without the host platform: a clear error naming the others
    let fresh3 = dir.join("fresh3");
    let err = fails(&mut kiln_env(
        &[],
        &fresh3,
        &["pull", &insecure, &format!("{host}/multi:foreign")],
    ));
    assert!(
        err.contains(&format!("{host}/multi:foreign"))
            && err.contains(&format!("linux/{other_arch}"))
            && err.contains("linux/riscv64")
            && err.contains(&format!("linux/{}", host_arch())),
        "{err}"
    );
    assert!(blobs(&fresh3).is_empty(), "{:?}", blobs(&fresh3));
}

#[test]
fn tls_registry_with_htpasswd_needs_kiln_login() {
    let dir = test_dir("registry-tls");
    let tls = tls_setup(&dir);
    let reg = Registry::start(&dir.join("reg"), Some(&tls));
    let host = reg.host();
    // Podman's certs.d layout: the private CA for this host
    let certs = dir.join("certs.d");
    fs::create_dir_all(certs.join(&host)).unwrap();
    fs::copy(&tls.ca, certs.join(&host).join("ca.crt")).unwrap();
    let auth_file = dir.join("auth").join("auth.json");
    fs::create_dir_all(auth_file.parent().unwrap()).unwrap();
    chown_to_test_user(&dir);
    let env = [
        ("KILN_CERTS_DIR", p(&certs).to_string()),
        ("REGISTRY_AUTH_FILE", p(&auth_file).to_string()),
    ];
    let state = dir.join("state");
    import_busybox(&dir, &state);
    let name = format!("{host}/secure/app:1");

    // no credentials: 401, and the error says what to run
    let err = fails(&mut kiln_env(
        &env,
        &state,
        &["push", "localhost/bb", &name],
    ));
    assert!(
        err.contains(&name) && err.contains("401") && err.contains(&format!("kiln login {host}")),
        "{err}"
    );

    // a wrong password is refused and nothing is written
    let mut bad = kiln_env(
        &env,
        &state,
        &["login", "-u", "kiln", "--password-stdin", &host],
    );
    let err = login_with(&mut bad, "wrong\n");
    assert!(
        !err.status.success(),
        "login with a wrong password succeeded"
    );
    // refused for the credentials, not for anything else
    let why = text(&err.stderr);
    assert!(why.contains("401") || why.contains("credentials"), "{why}");
    assert!(!auth_file.exists());

    let mut good = kiln_env(
        &env,
        &state,
        &["login", "-u", "kiln", "--password-stdin", &host],
    );
    let out = login_with(&mut good, "s3cret\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mode = fs::metadata(&auth_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let saved = fs::read_to_string(&auth_file).unwrap();
    assert!(
        saved.contains(&host) && !saved.contains("s3cret"),
        "{saved}"
    );

    let digest = ok(&mut kiln_env(
        &env,
        &state,
        &["push", "localhost/bb", &name],
    ));
    let fresh = dir.join("fresh");
    let pulled = ok(&mut kiln_env(&env, &fresh, &["pull", &name]));
    assert_eq!(pulled.trim(), digest.trim());

    // logout forgets them: the next pull is refused again
    ok(&mut kiln_env(&env, &state, &["logout", &host]));
    let fresh2 = dir.join("fresh2");
    let err = fails(&mut kiln_env(&env, &fresh2, &["pull", &name]));
    assert!(err.contains(&format!("kiln login {host}")), "{err}");

    // a credential helper named in ~/.docker/config.json (`credHelpers`)
    // answers instead: pull works with no login
    let home = dir.join("home");
    let bin = dir.join("bin");
    fs::create_dir_all(home.join(".docker")).unwrap();
    fs::create_dir_all(&bin).unwrap();
    fs::write(
        home.join(".docker/config.json"),
        format!(r#"{{"credHelpers": {{"{host}": "kilntest"}}}}"#),
    )
    .unwrap();
    let helper = bin.join("docker-credential-kilntest");
    fs::write(
        &helper,
        format!(
            "#!/bin/sh\nread server\n[ \"$1\" = get ] && [ \"$server\" = \"{host}\" ] || exit 1\necho '{{\"ServerURL\":\"{host}\",\"Username\":\"kiln\",\"Secret\":\"s3cret\"}}'\n"
        ),
    )
    .unwrap();
    fs::set_permissions(&helper, fs::Permissions::from_mode(0o755)).unwrap();
    chown_to_test_user(&dir);
    let env_helper = [
        ("KILN_CERTS_DIR", p(&certs).to_string()),
        ("REGISTRY_AUTH_FILE", p(&auth_file).to_string()),
        ("HOME", p(&home).to_string()),
        ("PATH", format!("{}:/usr/bin:/bin", p(&bin))),
    ];
    let fresh3 = dir.join("fresh3");
    let pulled = ok(&mut kiln_env(&env_helper, &fresh3, &["pull", &name]));
    assert_eq!(pulled.trim(), digest.trim());

    // without the CA the registry is not trusted
    let env_no_ca = [
        ("KILN_CERTS_DIR", p(&dir.join("no-certs")).to_string()),
        ("REGISTRY_AUTH_FILE", p(&auth_file).to_string()),
    ];
    let err = fails(&mut kiln_env(&env_no_ca, &fresh2, &["pull", &name]));
    assert!(err.contains(&name) && err.contains("certs.d"), "{err}");
}

/// `--pull`: a tag the store already has is resolved against its registry
/// again; without it the stored image is used (kiln prefers local).
#[test]
fn pull_resolves_a_stored_tag_against_its_registry_again() {
    let dir = test_dir("registry-pull");
    let reg = Registry::start(&dir.join("reg"), None);
    let host = reg.host();
    let insecure = format!("--insecure-registry={host}");
    let (publisher, consumer) = (dir.join("publisher"), dir.join("consumer"));
    import_busybox(&dir, &publisher);
    let name = format!("{host}/base:latest");
    let publish = |version: &str| {
        let ctx = context(
            &dir,
            &format!("pub-{version}"),
            &format!("FROM localhost/bb\nRUN echo {version} > /version\n"),
        );
        ok(&mut kiln_env(
            &[],
            &publisher,
            &["build", "-q", &insecure, "--push", "-t", &name, p(&ctx)],
        ));
    };
    let ctx = context(
        &dir,
        "use",
        &format!("FROM {name}\nRUN cp /version /seen\n"),
    );
    let out = dir.join("out");
    let dest = format!("type=local,dest={}", p(&out));
    let seen = |extra: &[&str]| {
        let mut args = vec!["build", "-q", insecure.as_str(), "-o", dest.as_str()];
        args.extend_from_slice(extra);
        args.push(p(&ctx));
        ok(&mut kiln_env(&[], &consumer, &args));
        fs::read_to_string(out.join("seen")).unwrap()
    };
    publish("one");
    assert_eq!(seen(&[]), "one\n");
    publish("two");
    // the store has the name: without --pull it is used as it is
    assert_eq!(seen(&[]), "one\n");
    assert_eq!(seen(&["--pull"]), "two\n");
    // the name now means the new image for builds without --pull too
    assert_eq!(seen(&[]), "two\n");
    let err = fails(&mut kiln_env(
        &[],
        &consumer,
        &["build", "--pull", "--network", "none", p(&ctx)],
    ));
    assert!(
        err.contains("--pull") && err.contains("--network=none"),
        "{err}"
    );
}

/// `-o type=registry,name=REF`: buildx's shorthand for an image output
/// that is pushed; the registry then serves the manifest the build printed.
#[test]
fn a_registry_output_pushes_its_names() {
    let dir = test_dir("registry-output");
    let reg = Registry::start(&dir.join("reg"), None);
    let host = reg.host();
    let insecure = format!("--insecure-registry={host}");
    let state = dir.join("state");
    import_busybox(&dir, &state);
    let ctx = context(&dir, "ctx", "FROM localhost/bb\nRUN echo pushed > /o\n");
    let built = run(&mut kiln_env(
        &[],
        &state,
        &[
            "build",
            &insecure,
            "--progress",
            "plain",
            "-o",
            &format!("type=registry,name={host}/out:1"),
            p(&ctx),
        ],
    ));
    let (out, log) = (text(&built.stdout), text(&built.stderr));
    assert!(built.status.success(), "{log}");
    let digest = out.trim().lines().last().unwrap().to_string();
    // the push is a vertex with its blobs' bytes
    assert_transfer_vertex(&log, &format!("pushing {host}/out:1"));
    let raw = curl(&[
        "-H",
        "Accept: application/vnd.oci.image.manifest.v1+json",
        &format!("http://{host}/v2/out/manifests/1"),
    ]);
    assert_eq!(sha256_of(&raw, &dir), digest);
    let err = fails(&mut kiln_env(
        &[],
        &state,
        &["build", &insecure, "-o", "type=registry", p(&ctx)],
    ));
    assert!(err.contains("needs name= or -t NAME"), "{err}");
    let err = fails(&mut kiln_env(
        &[],
        &state,
        &[
            "build",
            "-o",
            &format!("type=registry,name={host}/out:1,push=false"),
            p(&ctx),
        ],
    ));
    assert!(err.contains("type=registry always pushes"), "{err}");
}

/// The split multi-platform pattern of CI: one build per platform pushed
/// by digest, `kiln imagetools create` merges the digests into an index
/// under a tag (and into a second repository), `inspect` shows it, and a
/// build of each platform pulls its own image back through the tag.
#[test]
fn split_platform_builds_merge_into_one_index() {
    let dir = test_dir("registry-imagetools");
    let reg = Registry::start(&dir.join("reg"), None);
    let host = reg.host();
    let insecure = format!("--insecure-registry={host}");
    let state = dir.join("state");
    let mut digests = Vec::new();
    for arch in ["amd64", "arm64"] {
        let ctx = context(&dir, arch, "FROM scratch\nCOPY arch /arch\n");
        fs::write(ctx.join("arch"), arch).unwrap();
        chown_to_test_user(&ctx);
        let meta = dir.join(format!("{arch}.json"));
        fs::write(&meta, "").unwrap();
        chown_to_test_user(&meta);
        ok(&mut kiln_env(
            &[],
            &state,
            &[
                "build",
                &insecure,
                "--platform",
                &format!("linux/{arch}"),
                "--metadata-file",
                p(&meta),
                "-o",
                &format!("type=registry,name={host}/multi,push-by-digest=true"),
                p(&ctx),
            ],
        ));
        let m: serde_json::Value = serde_json::from_slice(&fs::read(&meta).unwrap()).unwrap();
        digests.push(m["containerimage.digest"].as_str().unwrap().to_string());
    }
    // pushed by digest only: no tag exists (`name=` defaulted it to latest)
    let code = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://{host}/v2/multi/manifests/latest"))
        .output()
        .unwrap();
    assert_eq!(text(&code.stdout), "404");
    let sources: Vec<String> = digests
        .iter()
        .map(|d| format!("{host}/multi@{d}"))
        .collect();
    let mut args = vec![
        "imagetools".to_string(),
        "create".into(),
        insecure.clone(),
        "-t".into(),
        format!("{host}/multi:1"),
        "-t".into(),
        format!("{host}/other:1"),
    ];
    args.extend(sources);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let index_digest = ok(&mut kiln_env(&[], &state, &args)).trim().to_string();
    let inspect = ok(&mut kiln_env(
        &[],
        &state,
        &[
            "imagetools",
            "inspect",
            &insecure,
            &format!("{host}/other:1"),
        ],
    ));
    assert!(
        inspect.contains(&format!("Digest:    {index_digest}")),
        "{inspect}"
    );
    for (d, arch) in digests.iter().zip(["amd64", "arm64"]) {
        assert!(inspect.contains(d.as_str()), "{inspect}");
        assert!(
            inspect.contains(&format!("Platform:  linux/{arch}")),
            "{inspect}"
        );
    }
    let raw = kiln_env(
        &[],
        &state,
        &[
            "imagetools",
            "inspect",
            "--raw",
            &insecure,
            &format!("{host}/multi:1"),
        ],
    )
    .output()
    .unwrap();
    assert_eq!(sha256_of(&raw.stdout, &dir), index_digest);
    // each platform's build pulls its own image through the tag, from
    // both repositories
    for repo in ["multi", "other"] {
        for arch in ["amd64", "arm64"] {
            let ctx = context(
                &dir,
                &format!("use-{repo}-{arch}"),
                &format!("FROM {host}/{repo}:1\n"),
            );
            let out = dir.join(format!("out-{repo}-{arch}"));
            ok(&mut kiln_env(
                &[],
                &dir.join(format!("fresh-{repo}-{arch}")),
                &[
                    "build",
                    &insecure,
                    "--platform",
                    &format!("linux/{arch}"),
                    "-o",
                    &format!("type=local,dest={}", p(&out)),
                    p(&ctx),
                ],
            ));
            assert_eq!(fs::read_to_string(out.join("arch")).unwrap(), arch);
        }
    }
    // two bases of one build, pulled at the same time into a fresh store
    let ctx = context(
        &dir,
        "two-bases",
        &format!("FROM {host}/multi:1 AS a\nFROM {host}/other:1\nCOPY --from=a /arch /a-arch\n"),
    );
    let out = dir.join("out-two");
    let built = run(&mut kiln_env(
        &[],
        &dir.join("fresh-two"),
        &[
            "build",
            &insecure,
            "--progress",
            "plain",
            "--platform",
            "linux/arm64",
            "-o",
            &format!("type=local,dest={}", p(&out)),
            p(&ctx),
        ],
    ));
    let log = text(&built.stderr);
    assert!(built.status.success(), "{log}");
    // each pull is a vertex, as BuildKit shows them; the two images share
    // blobs, which only the pull that fetches them first reports bytes of
    let vertices: Vec<String> = ["multi", "other"]
        .iter()
        .map(|repo| format!("FROM {host}/{repo}:1 (pull, linux/arm64)"))
        .collect();
    for v in &vertices {
        assert!(log.lines().any(|l| l.ends_with(v.as_str())), "{v}:\n{log}");
    }
    assert!(
        vertices.iter().any(|v| transfers(&log, v)),
        "no pull reported its bytes:\n{log}"
    );
    assert_eq!(fs::read_to_string(out.join("a-arch")).unwrap(), "arm64");
    assert_eq!(fs::read_to_string(out.join("arch")).unwrap(), "arm64");
}

/// Whether, in a plain progress `log`, the vertex named `name` reported a
/// blob's bytes through to "done".
fn transfers(log: &str, name: &str) -> bool {
    let Some(line) = log.lines().find(|l| l.ends_with(name)) else {
        return false;
    };
    let id = line.split(' ').next().unwrap_or("");
    log.lines()
        .any(|l| l.starts_with(&format!("{id} sha256:")) && l.ends_with(" done"))
}

/// In a plain progress `log`, the vertex named `name` reported a blob's
/// bytes through to "done", then ended.
fn assert_transfer_vertex(log: &str, name: &str) {
    assert!(transfers(log, name), "{name}:\n{log}");
    let line = log.lines().find(|l| l.ends_with(name)).unwrap();
    let id = line.split(' ').next().unwrap();
    assert!(
        log.lines().any(|l| l.starts_with(&format!("{id} DONE"))),
        "{log}"
    );
}

fn login_with(cmd: &mut Command, input: &str) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kiln login");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn unreachable_registry_and_corrupt_blobs_leave_nothing_stored() {
    let dir = test_dir("registry-bad");
    // a closed port
    let closed = free_port();
    let state = dir.join("state");
    import_busybox(&dir, &state);
    let images_before = ok(&mut kiln_env(&[], &state, &["images"]));
    let blobs_before = blobs(&state);
    let name = format!("127.0.0.1:{closed}/x:1");
    let err = fails(&mut kiln_env(
        &[],
        &state,
        &[
            "pull",
            &format!("--insecure-registry=127.0.0.1:{closed}"),
            &name,
        ],
    ));
    assert!(err.contains(&name) && err.contains("unreachable"), "{err}");
    assert_eq!(ok(&mut kiln_env(&[], &state, &["images"])), images_before);
    assert_eq!(blobs(&state), blobs_before);

    // a registry serving a truncated, then a corrupted layer
    let reg = Registry::start(&dir.join("reg"), None);
    let host = reg.host();
    let insecure = format!("--insecure-registry={host}");
    let name = format!("{host}/bad:1");
    ok(&mut kiln_env(
        &[],
        &state,
        &["push", &insecure, "localhost/bb", &name],
    ));
    let raw = curl(&[
        "-H",
        "Accept: application/vnd.oci.image.manifest.v1+json",
        &format!("http://{host}/v2/bad/manifests/1"),
    ]);
    let manifest: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let blob = reg.blob_file(&layer);
    let good = fs::read(&blob).unwrap();

    let fresh = dir.join("fresh");
    fs::write(&blob, &good[..good.len() / 2]).unwrap();
    let err = fails(&mut kiln_env(&[], &fresh, &["pull", &insecure, &name]));
    assert!(err.contains(&name) && err.contains(&layer), "{err}");
    assert!(err.contains("corrupt or truncated"), "{err}");
    assert!(blobs(&fresh).is_empty(), "stray blobs: {:?}", blobs(&fresh));
    let listing = ok(&mut kiln_env(&[], &fresh, &["images"]));
    assert_eq!(listing.lines().count(), 1, "{listing}");

    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0xff;
    fs::write(&blob, &flipped).unwrap();
    let err = fails(&mut kiln_env(&[], &fresh, &["pull", &insecure, &name]));
    assert!(
        err.contains(&name) && err.contains(&layer) && err.contains("corrupt or truncated"),
        "{err}"
    );
    assert!(blobs(&fresh).is_empty(), "stray blobs: {:?}", blobs(&fresh));

    // a blob longer than its descriptor says: refused at the declared
    // size, not read to its end
    let mut longer = good.clone();
    longer.resize(good.len() + (64 << 20), 0);
    fs::write(&blob, &longer).unwrap();
    let err = fails(&mut kiln_env(&[], &fresh, &["pull", &insecure, &name]));
    assert!(
        err.contains(&layer) && err.contains(&format!("more than the {} bytes", good.len())),
        "{err}"
    );
    assert!(blobs(&fresh).is_empty(), "stray blobs: {:?}", blobs(&fresh));

    // with the blob repaired the same pull works
    fs::write(&blob, &good).unwrap();
    ok(&mut kiln_env(&[], &fresh, &["pull", &insecure, &name]));
    assert!(!blobs(&fresh).is_empty());

    // a config over 4 MiB is refused before it is fetched: the registry's
    // stored manifest rewritten (as a hostile registry would serve it)
    let mut big_config = manifest.clone();
    big_config["config"]["size"] = serde_json::json!(64u64 << 30);
    reg.store_manifest("bad", "1", &serde_json::to_vec(&big_config).unwrap(), &dir);
    let err = fails(&mut kiln_env(
        &[],
        &dir.join("fresh3"),
        &["pull", &insecure, &name],
    ));
    assert!(
        err.contains("its config is 68719476736 bytes, more than the 4194304 bytes"),
        "{err}"
    );
    reg.store_manifest("bad", "1", &raw, &dir);
    ok(&mut kiln_env(
        &[],
        &dir.join("fresh4"),
        &["pull", &insecure, &name],
    ));
    ok(&mut kiln_env(&[], &fresh, &["pull", &insecure, &name]));
    assert!(!blobs(&fresh).is_empty());
}

#[test]
fn registries_config_mirror_is_tried_before_the_origin() {
    let dir = test_dir("registry-mirror");
    let mirror = Registry::start(&dir.join("mirror"), None);
    let mhost = mirror.host();
    let state = dir.join("state");
    import_busybox(&dir, &state);
    // the origin is a closed port: only the mirror can answer
    let origin = format!("127.0.0.1:{}", free_port());
    ok(&mut kiln_env(
        &[],
        &state,
        &[
            "push",
            &format!("--insecure-registry={mhost}"),
            "localhost/bb",
            &format!("{mhost}/lib/bb:1"),
        ],
    ));
    let conf = dir.join("registries.toml");
    fs::write(
        &conf,
        format!(
            "[[registry]]\nlocation = \"{origin}\"\ninsecure = true\nmirror = [{{ location = \"{mhost}\", insecure = true }}]\n"
        ),
    )
    .unwrap();
    let env = [("KILN_REGISTRIES_CONF", p(&conf).to_string())];
    let fresh = dir.join("fresh");
    let name = format!("{origin}/lib/bb:1");
    ok(&mut kiln_env(&env, &fresh, &["pull", &name]));
    let listing = ok(&mut kiln_env(&env, &fresh, &["images"]));
    assert!(listing.contains(&format!("{origin}/lib/bb")), "{listing}");
    // a name the mirror lacks falls back to the origin, whose error is shown
    let err = fails(&mut kiln_env(
        &env,
        &fresh,
        &["pull", &format!("{origin}/lib/none:1")],
    ));
    assert!(
        err.contains("unreachable") && err.contains(&origin),
        "{err}"
    );
}

#[test]
fn a_registry_cache_and_an_inline_cache_warm_a_fresh_state_directory() {
    let dir = test_dir("registry-cache");
    let reg = Registry::start(&dir.join("reg"), None);
    let host = reg.host();
    let insecure = format!("--insecure-registry={host}");
    let state = dir.join("state");
    import_busybox(&dir, &state);
    let ctx = context(
        &dir,
        "ctx",
        "FROM localhost/bb AS builder\nRUN echo built > /artifact && echo other > /other\n\nFROM localhost/bb\nCOPY --from=builder /artifact /artifact\nRUN cat /artifact > /final\n",
    );
    let build = |state: &Path, extra: &[&str]| -> String {
        let mut args = vec!["build", "--progress", "plain", &insecure];
        args.extend_from_slice(extra);
        args.push(p(&ctx));
        let out = run(&mut kiln_env(&[], state, &args));
        let err = text(&out.stderr);
        assert!(out.status.success(), "{args:?}:\n{err}");
        err
    };
    let cache_ref = format!("{host}/cache:main");
    let image_ref = format!("{host}/app:inline");
    // The base image goes to the registry too: a fresh runner pulls it.
    ok(&mut kiln_env(
        &[],
        &state,
        &[&insecure, "push", "localhost/bb", &format!("{host}/bb:1")],
    ));
    let ctx_df = ctx.join("Dockerfile");
    let df = fs::read_to_string(&ctx_df)
        .unwrap()
        .replace("localhost/bb", &format!("{host}/bb:1"));
    fs::write(&ctx_df, df).unwrap();
    chown_to_test_user(&ctx);
    let err = build(
        &state,
        &[
            "--cache-to",
            &format!("type=registry,ref={cache_ref},mode=max"),
            "--cache-to",
            "type=inline",
            "--push",
            "-t",
            &image_ref,
        ],
    );
    assert!(err.contains("2 steps run"), "{err}");
    // the cache export and the push are vertices with their bytes
    assert_transfer_vertex(&err, &format!("exporting cache to {cache_ref}"));
    assert_transfer_vertex(&err, &format!("pushing {image_ref}"));
    // the build stored its layers plain; the push sent them as gzip
    let manifest: serde_json::Value = serde_json::from_slice(&curl(&[
        "-H",
        "Accept: application/vnd.oci.image.manifest.v1+json",
        &format!("http://{host}/v2/app/manifests/inline"),
    ]))
    .unwrap();
    let types = kiln_vm_tests::layer_media_types(&manifest);
    assert!(
        types.len() == 3 && types.iter().all(|t| t.ends_with("gzip")),
        "{types:?}"
    );

    // type=registry, mode=max: nothing runs on a fresh state directory;
    // the layers a cached step brings in show their bytes on its line
    let err = build(
        &dir.join("fresh-1"),
        &["--cache-from", &format!("type=registry,ref={cache_ref}")],
    );
    assert!(err.contains("0 steps run"), "{err}");
    let cached_with_bytes = err.lines().any(|l| {
        let id = l.split(' ').next().unwrap_or("");
        l.contains(" sha256:")
            && l.ends_with(" done")
            && err.lines().any(|m| m == format!("{id} CACHED"))
    });
    assert!(cached_with_bytes, "{err}");

    // inline (min): the image's own steps hit; the builder stage's RUN,
    // not on the final image's chain, runs.
    let err = build(
        &dir.join("fresh-2"),
        &["--cache-from", &format!("type=registry,ref={image_ref}")],
    );
    assert!(err.contains("1 steps run"), "{err}");

    // A cache reference that does not exist is a warning, not a failure.
    let err = build(
        &dir.join("fresh-3"),
        &[
            "--cache-from",
            &format!("type=registry,ref={host}/nothing:here"),
        ],
    );
    assert!(err.contains("WARNING: --cache-from"), "{err}");
    assert!(err.contains("2 steps run"), "{err}");
}

/// docker-registry never serves a manifest over 4 MiB itself, so a
/// registry that does is a few lines here: `/v2/` answers 200 and a
/// manifest request gets a 5 MiB body with its length declared, or a
/// 64 MiB one without (read until close). kiln refuses both, and stops
/// reading the second.
#[test]
fn manifests_over_4_mib_are_refused_before_being_read_whole() {
    use std::io::{BufRead, BufReader, Write as _};
    use std::sync::atomic::{AtomicU64, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = std::sync::Arc::new(AtomicU64::new(0));
    let counter = served.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let counter = counter.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut request = String::new();
                reader.read_line(&mut request).unwrap_or(0);
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 2 {
                    line.clear();
                }
                let mut conn = conn;
                let path = request.split_whitespace().nth(1).unwrap_or("");
                let head = "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n";
                if path == "/v2/" {
                    let _ = write!(conn, "{head}Content-Length: 2\r\n\r\n{{}}");
                } else if path.contains("/manifests/sized") {
                    let _ = write!(conn, "{head}Content-Length: {}\r\n\r\n", 5 << 20);
                    let _ = conn.write_all(&vec![b' '; 5 << 20]);
                } else {
                    let _ = write!(conn, "{head}\r\n{{\"schemaVersion\":2,\"pad\":\"");
                    let chunk = vec![b'x'; 64 << 10];
                    for _ in 0..1024 {
                        if conn.write_all(&chunk).is_err() {
                            break;
                        }
                        counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let dir = test_dir("registry-huge-manifest");
    let state = dir.join("state");
    let host = format!("127.0.0.1:{port}");
    let insecure = format!("--insecure-registry={host}");
    for tag in ["sized", "streamed"] {
        let name = format!("{host}/huge:{tag}");
        let err = fails(&mut kiln_env(&[], &state, &["pull", &insecure, &name]));
        assert!(
            err.contains(&name) && err.contains("the 4194304 bytes kiln reads"),
            "{tag}: {err}"
        );
    }
    let served = served.load(Ordering::Relaxed);
    assert!(served < 32 << 20, "kiln read on: {served} bytes served");
}

/// A registry that wants bearer tokens, as Docker Hub does: `/v2/` answers
/// 401 with a challenge naming its own `/token`. Repository `tok/ok` gets a
/// token and a small image; `tok/huge`'s token response never ends;
/// `err/blob`'s config blob answers 500 with a body that never ends.
fn token_registry(served: std::sync::Arc<std::sync::atomic::AtomicU64>, dir: &Path) -> u16 {
    use std::io::{BufRead, BufReader, Write as _};
    use std::sync::atomic::Ordering;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = br#"{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":[]}}"#.to_vec();
    let config_digest = sha256_of(&config, dir);
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[]}}"#,
        config.len()
    );
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let (served, config, manifest) = (served.clone(), config.clone(), manifest.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut request = String::new();
                reader.read_line(&mut request).unwrap_or(0);
                let mut bearer = false;
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap_or(0) > 2 {
                    bearer |= line.eq_ignore_ascii_case("authorization: bearer good\r\n");
                    line.clear();
                }
                let mut conn = conn;
                let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
                let challenge = format!(
                    "HTTP/1.1 401 Unauthorized\r\nConnection: close\r\nWWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"fake\"\r\nContent-Length: 0\r\n\r\n"
                );
                let endless = |conn: &mut TcpStream, head: &str| {
                    let _ = write!(conn, "{head}Connection: close\r\n\r\n");
                    let chunk = vec![b'x'; 64 << 10];
                    for _ in 0..1024 {
                        if conn.write_all(&chunk).is_err() {
                            break;
                        }
                        served.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    }
                };
                let ok = |conn: &mut TcpStream, ct: &str, body: &[u8]| {
                    let _ = write!(
                        conn,
                        "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    );
                    let _ = conn.write_all(body);
                };
                if path.starts_with("/token") {
                    if path.contains("tok%2Fhuge") || path.contains("tok/huge") {
                        endless(
                            &mut conn,
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n",
                        );
                    } else {
                        ok(&mut conn, "application/json", br#"{"token":"good"}"#);
                    }
                } else if !bearer {
                    let _ = conn.write_all(challenge.as_bytes());
                } else if path.ends_with("/manifests/latest") {
                    ok(
                        &mut conn,
                        "application/vnd.oci.image.manifest.v1+json",
                        manifest.as_bytes(),
                    );
                } else if path.starts_with("/v2/err/blob/blobs/") {
                    endless(
                        &mut conn,
                        "HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n",
                    );
                } else if path.contains("/blobs/") {
                    ok(&mut conn, "application/octet-stream", &config);
                } else {
                    let _ = conn.write_all(
                        b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                    );
                }
            });
        }
    });
    port
}

#[test]
fn token_responses_and_error_bodies_are_read_with_a_bound() {
    use std::sync::atomic::Ordering;
    let dir = test_dir("registry-token-bound");
    let state = dir.join("state");
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let port = token_registry(served.clone(), &dir);
    let host = format!("127.0.0.1:{port}");
    let insecure = format!("--insecure-registry={host}");
    // the token dance works: the image is pulled with the bearer token
    let ok_name = format!("{host}/tok/ok:latest");
    ok(&mut kiln_env(&[], &state, &["pull", &insecure, &ok_name]));
    let listing = ok(&mut kiln_env(&[], &state, &["images"]));
    assert!(listing.contains(&format!("{host}/tok/ok")), "{listing}");
    // a token service that never stops talking is cut off
    let name = format!("{host}/tok/huge:latest");
    let err = fails(&mut kiln_env(&[], &state, &["pull", &insecure, &name]));
    assert!(
        err.contains(&name) && err.contains("the 1048576 bytes kiln reads"),
        "{err}"
    );
    // an error body that never ends is cut off, its start quoted (a
    // fresh store: the config blob is stored in the first one)
    let name = format!("{host}/err/blob:latest");
    let err = fails(&mut kiln_env(
        &[],
        &dir.join("fresh"),
        &["pull", &insecure, &name],
    ));
    assert!(err.contains("HTTP 500") && err.contains("xxxx"), "{err}");
    assert!(err.len() < 16 << 10, "the whole error body was quoted");
    let served = served.load(Ordering::Relaxed);
    assert!(served < 32 << 20, "kiln read on: {served} bytes served");
}
