//! Running one conformance case: write its context, run `kiln build` as
//! the test user for each of its builds, and check what they produced.

use super::case::{Build, Case, FileCheck, FileSpec};
use kiln_vm_tests::{
    kiln, kiln_binary, run_checked, running_as_root, stage_file, test_ids, unprivileged,
};
use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Where a case runs: its own directory, and the state directory it
/// builds on.
pub struct Place {
    pub dir: PathBuf,
    pub state: PathBuf,
    /// `@HTTP@`: the case's server, when it has files or repositories.
    pub http: String,
    /// `@REGISTRY@`: HOST:PORT of the run's registry (plain HTTP on
    /// 127.0.0.1), empty when no case needs one.
    pub registry: String,
}

/// Run every build of `case`; the first failed check is the error.
pub fn run_case(case: &Case, place: &mut Place) -> Result<(), String> {
    let _server = if case.serve.is_empty() && case.repo.is_empty() {
        None
    } else {
        let s = super::serve::start(&case.serve, &case.repo, &place.dir)?;
        place.http = s.url.clone();
        Some(s)
    };
    let place = &*place;
    let mut dockerfile_at: Option<PathBuf> = None;
    let builds: Vec<&Build> = std::iter::once(&case.first).chain(&case.then).collect();
    for (i, b) in builds.iter().enumerate() {
        prepare(b, place, &mut dockerfile_at).map_err(|e| format!("build {i}: setup: {e}"))?;
        one_build(b, i, place).map_err(|e| {
            if builds.len() > 1 {
                format!("build {i}: {e}")
            } else {
                e
            }
        })?;
    }
    Ok(())
}

fn subst(s: &str, place: &Place) -> String {
    s.replace("@HTTP@", &place.http)
        .replace("@REGISTRY@", &place.registry)
        .replace("@CTX@", &place.dir.join("ctx").display().to_string())
        .replace("@DIR@", &place.dir.display().to_string())
}

fn prepare(b: &Build, place: &Place, dockerfile_at: &mut Option<PathBuf>) -> Result<(), String> {
    let ctx = place.dir.join("ctx");
    fs::create_dir_all(&ctx).map_err(|e| e.to_string())?;
    for r in &b.remove {
        let p = place.dir.join("ctx").join(r);
        let _ = fs::remove_file(&p).or_else(|_| fs::remove_dir_all(&p));
    }
    if let Some(script) = &b.setup {
        let out = Command::new("sh")
            .arg("-ec")
            .arg(subst(script, place))
            .current_dir(&place.dir)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "setup script: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    for f in &b.files {
        write_file(f, place)?;
    }
    if let Some(text) = &b.dockerfile {
        let text = subst(text, place);
        let p = ctx.join(b.file.as_deref().unwrap_or("Dockerfile"));
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        fs::write(&p, text).map_err(|e| e.to_string())?;
        *dockerfile_at = Some(p);
    }
    if running_as_root() {
        let (uid, gid) = test_ids();
        // chown only: the modes the case gave must stay as they are
        run_checked(
            Command::new("chown")
                .arg("-R")
                .arg("-h")
                .arg(format!("{uid}:{gid}"))
                .arg(&place.dir),
        );
    }
    Ok(())
}

fn write_file(f: &FileSpec, place: &Place) -> Result<(), String> {
    let p = place
        .dir
        .join(f.in_dir.as_deref().unwrap_or("ctx"))
        .join(&f.path);
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let _ = fs::remove_file(&p);
    if let Some(target) = &f.symlink {
        std::os::unix::fs::symlink(target, &p).map_err(|e| format!("{}: {e}", f.path))?;
        return Ok(());
    }
    if f.dir {
        fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", f.path))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(f.mode.unwrap_or(0o755)))
            .map_err(|e| e.to_string())?;
        return Ok(());
    }
    let data = match (&f.data, &f.base64) {
        (_, Some(b)) => {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(b.split_whitespace().collect::<String>())
                .map_err(|e| format!("{}: base64: {e}", f.path))?
        }
        (Some(d), None) => subst(d, place).into_bytes(),
        (None, None) => Vec::new(),
    };
    fs::write(&p, data).map_err(|e| format!("{}: {e}", f.path))?;
    fs::set_permissions(&p, fs::Permissions::from_mode(f.mode.unwrap_or(0o644)))
        .map_err(|e| e.to_string())
}

fn out_dir(place: &Place, i: usize, kind: &str) -> PathBuf {
    place.dir.join(format!("out{i}-{kind}"))
}

/// The output a file check reads.
fn kind(c: &FileCheck) -> &str {
    if c.uid.is_some() || c.gid.is_some() {
        return "tar";
    }
    c.output.as_deref().unwrap_or("local")
}

fn one_build(b: &Build, i: usize, place: &Place) -> Result<(), String> {
    if b.prune {
        let out = kiln([
            "--root",
            &place.state.display().to_string(),
            "prune",
            "--all",
        ])
        .output()
        .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "kiln prune: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    let needs_local = b.expect.iter().any(|c| kind(c) == "local");
    let needs_tar = b.expect.iter().any(|c| kind(c) == "tar");
    let needs_oci = b.expect.iter().any(|c| kind(c) == "oci")
        || !b.config.is_empty()
        || !b.config_contains.is_empty()
        || !b.config_absent.is_empty()
        || !b.config_len.is_empty();
    let mut args: Vec<String> = vec![
        "--root".into(),
        place.state.display().to_string(),
        "build".into(),
        "--progress".into(),
        "plain".into(),
    ];
    if !place.registry.is_empty() {
        args.push("--insecure-registry".into());
        args.push(place.registry.clone());
    }
    if let Some(f) = &b.file {
        args.push("-f".into());
        args.push(place.dir.join("ctx").join(f).display().to_string());
    }
    if needs_local {
        args.push("-o".into());
        args.push(format!(
            "type=local,dest={}",
            out_dir(place, i, "local").display()
        ));
    }
    if needs_tar {
        args.push("-o".into());
        args.push(format!(
            "type=tar,dest={}.tar",
            out_dir(place, i, "tar").display()
        ));
    }
    if needs_oci {
        args.push("-o".into());
        args.push(format!(
            "type=oci,tar=false,dest={}",
            out_dir(place, i, "oci").display()
        ));
    }
    args.extend(b.args.iter().map(|a| subst(a, place)));
    let stdin_tar = b.context.as_deref() == Some("-");
    match b.context.as_deref() {
        Some("-") => args.push("-".into()),
        // a URL (a git context): as it is
        Some(c) if subst(c, place).contains("://") || c.starts_with("git@") => {
            args.push(subst(c, place))
        }
        Some(c) => args.push(place.dir.join(c).display().to_string()),
        None => args.push(place.dir.join("ctx").display().to_string()),
    }
    // the test user's kiln gets a clean environment (setpriv): variables
    // go through env(1)
    let mut cmd = if b.env.is_empty() {
        kiln(&args)
    } else {
        let mut cmd = unprivileged(Path::new("/usr/bin/env"));
        for kv in &b.env {
            let kv = subst(kv, place);
            if !kv.contains('=') {
                return Err(format!("env {kv:?}: not K=V"));
            }
            cmd.arg(kv);
        }
        cmd.arg(stage_file(&kiln_binary()));
        cmd.args(&args);
        cmd
    };
    let out = if stdin_tar {
        let tar = run_checked(
            Command::new("tar")
                .arg("-C")
                .arg(place.dir.join("ctx"))
                .args(["-cf", "-", "."]),
        );
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&tar.stdout)
            .map_err(|e| e.to_string())?;
        child.wait_with_output().map_err(|e| e.to_string())?
    } else {
        cmd.stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let tail = || last_lines(&stderr, 15);
    if let Some(code) = b.exit {
        if out.status.code() != Some(code) {
            return Err(format!(
                "exit status {:?}, not {code}:\n{}\nstdout:\n{}",
                out.status.code(),
                tail(),
                last_lines(&stdout, 15)
            ));
        }
    }
    match (&b.error, out.status.success() || b.exit.is_some()) {
        (Some(want), true) => {
            return Err(format!(
                "built, but should have failed with {want:?}\n{}",
                tail()
            ))
        }
        (Some(want), false) => {
            if !stderr.contains(want.as_str()) {
                return Err(format!("failed without {want:?}:\n{}", tail()));
            }
        }
        (None, false) => return Err(format!("kiln build failed:\n{}", tail())),
        (None, true) => {}
    }
    for s in &b.stderr {
        if !stderr.contains(s.as_str()) {
            return Err(format!("stderr lacks {s:?}:\n{}", tail()));
        }
    }
    for s in &b.not_stderr {
        if stderr.contains(s.as_str()) {
            return Err(format!("stderr has {s:?}:\n{}", tail()));
        }
    }
    for s in &b.stdout {
        if !stdout.contains(s.as_str()) {
            return Err(format!("stdout lacks {s:?}:\n{}", last_lines(&stdout, 15)));
        }
    }
    check_cache(b, &stderr)?;
    for c in &b.expect {
        check_file(c, i, place).map_err(|e| format!("{}: {e}", c.path))?;
    }
    if needs_oci {
        check_config(b, &out_dir(place, i, "oci"), place)?;
    }
    Ok(())
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Steps by their progress line (`#N [stage k/n] STEP`), and which of
/// them were cached (`#N CACHED`).
fn check_cache(b: &Build, stderr: &str) -> Result<(), String> {
    if b.cached.is_empty() && b.not_cached.is_empty() {
        return Ok(());
    }
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    let mut cached: HashSet<String> = HashSet::new();
    for line in stderr.lines() {
        let Some((id, rest)) = line.split_once(' ') else {
            continue;
        };
        if !id.starts_with('#') {
            continue;
        }
        if rest == "CACHED" {
            cached.insert(id.to_string());
        } else if rest.starts_with('[') {
            names
                .entry(id.to_string())
                .or_insert_with(|| rest.to_string());
        }
    }
    let find = |step: &str| -> Result<bool, String> {
        let ids: Vec<&String> = names
            .iter()
            .filter(|(_, n)| n.contains(step))
            .map(|(id, _)| id)
            .collect();
        if ids.is_empty() {
            return Err(format!("no step {step:?} in the progress output"));
        }
        Ok(ids.iter().all(|id| cached.contains(*id)))
    };
    for s in &b.cached {
        if !find(s)? {
            return Err(format!(
                "step {s:?} was not cached:\n{}",
                last_lines(stderr, 30)
            ));
        }
    }
    for s in &b.not_cached {
        if find(s)? {
            return Err(format!(
                "step {s:?} was cached:\n{}",
                last_lines(stderr, 30)
            ));
        }
    }
    Ok(())
}

fn check_file(c: &FileCheck, i: usize, place: &Place) -> Result<(), String> {
    if kind(c) == "tar" {
        return check_owner(c, &out_dir(place, i, "tar"));
    }
    let root = out_dir(place, i, kind(c));
    let p = root.join(c.path.trim_start_matches('/'));
    let meta = fs::symlink_metadata(&p);
    if c.absent {
        return match meta {
            Ok(_) => Err("exists, should not".into()),
            Err(_) => Ok(()),
        };
    }
    let meta = meta.map_err(|e| format!("missing: {e}"))?;
    if let Some(target) = &c.link {
        let got = fs::read_link(&p).map_err(|e| format!("not a symlink: {e}"))?;
        if got != Path::new(target) {
            return Err(format!("links to {}, not {target}", got.display()));
        }
    }
    if c.dir && !meta.is_dir() {
        return Err("not a directory".into());
    }
    if let Some(mode) = c.mode {
        let got = meta.mode() & 0o7777;
        if got != mode {
            return Err(format!("mode {got:o}, not {mode:o}"));
        }
    }
    if let Some(names) = &c.entries {
        let mut got: Vec<String> = fs::read_dir(&p)
            .map_err(|e| e.to_string())?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        got.sort();
        let mut want = names.clone();
        want.sort();
        if got != want {
            return Err(format!("entries {got:?}, not {want:?}"));
        }
    }
    let needs_data = c.content.is_some()
        || c.contains.is_some()
        || c.not_contains.is_some()
        || c.same_as.is_some()
        || c.differs_from.is_some();
    if !needs_data {
        return Ok(());
    }
    let data = fs::read(&p).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&data);
    if let Some(want) = &c.content {
        if text != want.as_str() {
            return Err(format!("contents {text:?}, not {want:?}"));
        }
    }
    if let Some(want) = &c.contains {
        if !text.contains(want.as_str()) {
            return Err(format!("contents {text:?} lack {want:?}"));
        }
    }
    if let Some(want) = &c.not_contains {
        if text.contains(want.as_str()) {
            return Err(format!("contents {text:?} have {want:?}"));
        }
    }
    let other = |j: usize| {
        fs::read(out_dir(place, j, kind(c)).join(c.path.trim_start_matches('/')))
            .map_err(|e| format!("build {j}'s copy: {e}"))
    };
    if let Some(j) = c.same_as {
        if other(j)? != data {
            return Err(format!("differs from build {j}'s: {text:?}"));
        }
    }
    if let Some(j) = c.differs_from {
        if other(j)? == data {
            return Err(format!("same as build {j}'s: {text:?}"));
        }
    }
    Ok(())
}

fn check_owner(c: &FileCheck, tar_base: &Path) -> Result<(), String> {
    let tar_path = PathBuf::from(format!("{}.tar", tar_base.display()));
    let file = fs::File::open(&tar_path).map_err(|e| format!("{}: {e}", tar_path.display()))?;
    let mut ar = tar::Archive::new(file);
    let want = c.path.trim_start_matches('/').trim_end_matches('/');
    for entry in ar.entries().map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        let path = entry
            .path()
            .map_err(|e| e.to_string())?
            .display()
            .to_string();
        if path.trim_start_matches("./").trim_end_matches('/') != want {
            continue;
        }
        let h = entry.header();
        let (uid, gid) = (h.uid().unwrap_or(u64::MAX), h.gid().unwrap_or(u64::MAX));
        if c.uid.is_some_and(|u| u != uid) || c.gid.is_some_and(|g| g != gid) {
            return Err(format!("owner {uid}:{gid}, not {:?}:{:?}", c.uid, c.gid));
        }
        if let Some(mode) = c.mode {
            let got = h.mode().unwrap_or(0) & 0o7777;
            if got != mode {
                return Err(format!("mode {got:o}, not {mode:o}"));
            }
        }
        return Ok(());
    }
    Err("not in the tar output".into())
}

/// `{"index", "manifest", "image"}` of an OCI layout output holding one
/// image (or, for an index of several, `manifests` and `images` too).
fn oci_doc(dir: &Path) -> Result<serde_json::Value, String> {
    let read = |p: PathBuf| -> Result<serde_json::Value, String> {
        let text = fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", p.display()))
    };
    let blob = |d: &serde_json::Value| -> Result<serde_json::Value, String> {
        let digest = d["digest"].as_str().ok_or("descriptor without digest")?;
        read(dir.join("blobs").join(digest.replacen(':', "/", 1)))
    };
    let index = read(dir.join("index.json"))?;
    let top = blob(&index["manifests"][0])?;
    let mut doc = serde_json::json!({ "index": index });
    if top["manifests"].is_array() {
        let mut manifests = Vec::new();
        let mut images = Vec::new();
        for d in top["manifests"].as_array().unwrap() {
            let m = blob(d)?;
            images.push(blob(&m["config"])?);
            manifests.push(m);
        }
        doc["image_index"] = top;
        doc["manifest"] = manifests[0].clone();
        doc["image"] = images[0].clone();
        doc["manifests"] = manifests.into();
        doc["images"] = images.into();
    } else {
        doc["image"] = blob(&top["config"])?;
        doc["manifest"] = top;
    }
    Ok(doc)
}

fn check_config(b: &Build, dir: &Path, place: &Place) -> Result<(), String> {
    let doc = oci_doc(dir)?;
    let at = |ptr: &str| doc.pointer(ptr).cloned().unwrap_or(serde_json::Value::Null);
    for (ptr, want) in &b.config {
        let want = subst_json(
            serde_json::to_value(want).map_err(|e| e.to_string())?,
            place,
        );
        let got = at(ptr);
        if got != want {
            return Err(format!("config {ptr}: {got}, not {want}"));
        }
    }
    for (ptr, want) in &b.config_contains {
        let got = at(ptr);
        let text = got
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| got.to_string());
        if !text.contains(want.as_str()) {
            return Err(format!("config {ptr}: {text:?} lacks {want:?}"));
        }
    }
    for ptr in &b.config_absent {
        let got = at(ptr);
        if !got.is_null() {
            return Err(format!("config {ptr}: {got}, should be absent"));
        }
    }
    for (ptr, n) in &b.config_len {
        let got = at(ptr);
        let len = got
            .as_array()
            .map(Vec::len)
            .or_else(|| got.as_object().map(|o| o.len()));
        if len != Some(*n) {
            return Err(format!("config {ptr}: length {len:?}, not {n}: {got}"));
        }
    }
    Ok(())
}

fn subst_json(v: serde_json::Value, place: &Place) -> serde_json::Value {
    match v {
        serde_json::Value::String(s) => serde_json::Value::String(subst(&s, place)),
        serde_json::Value::Array(a) => a.into_iter().map(|v| subst_json(v, place)).collect(),
        serde_json::Value::Object(o) => o
            .into_iter()
            .map(|(k, v)| (k, subst_json(v, place)))
            .collect(),
        other => other,
    }
}
