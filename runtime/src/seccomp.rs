//! Seccomp programs for a sandbox: kiln's default profile, compiled to BPF at
//! build time from `seccomp-profiles/default.json`, or another profile in
//! seccompiler's JSON format named by the spec, or none (`unconfined`).
//!
//! The default profile's JSON has two filters. `main` is an allowlist
//! answering EPERM to everything it does not name (an allowlist also rejects
//! x32 syscall numbers). `clone3` answers ENOSYS to clone3, so libc falls
//! back to clone, whose flags `main` can inspect. build.rs merges them into
//! one compact program (a binary search over syscall number ranges), so a
//! step installs one filter and the kernel's per-syscall action cache is
//! cheap to build.

use std::path::Path;

use crate::error::{Error, Result};

const DEFAULT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp-default.bpf"));

/// Which profile a sandbox runs under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Profile {
    Default,
    Unconfined,
    /// a seccompiler JSON file; every filter in it is installed, in name order
    File(std::path::PathBuf),
}

impl Profile {
    /// `default`, `unconfined`, or a path to a profile file.
    pub fn parse(s: &str) -> Profile {
        match s {
            "" | "default" => Profile::Default,
            "unconfined" => Profile::Unconfined,
            path => Profile::File(path.into()),
        }
    }

    /// The BPF programs to install, in order.
    pub fn programs(&self) -> Result<Vec<Vec<libc::sock_filter>>> {
        match self {
            Profile::Default => Ok(vec![decode(DEFAULT)]),
            Profile::Unconfined => Ok(Vec::new()),
            Profile::File(path) => compile_file(path),
        }
    }
}

/// The digest of the default profile's BPF, for `kiln info` and tests.
pub fn default_profile_bytes() -> &'static [u8] {
    DEFAULT
}

fn decode(bytes: &[u8]) -> Vec<libc::sock_filter> {
    bytes
        .chunks_exact(8)
        .map(|c| libc::sock_filter {
            code: u16::from_ne_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect()
}

fn compile_file(path: &Path) -> Result<Vec<Vec<libc::sock_filter>>> {
    let err = |reason: String| Error::SeccompProfile {
        path: path.to_path_buf(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let arch = std::env::consts::ARCH.try_into().map_err(|_| {
        err(format!(
            "unsupported architecture {}",
            std::env::consts::ARCH
        ))
    })?;
    let map = seccompiler::compile_from_json(file, arch).map_err(|e| err(e.to_string()))?;
    let mut names: Vec<_> = map.keys().cloned().collect();
    names.sort();
    if names.is_empty() {
        return Err(err("the profile defines no filter".into()));
    }
    Ok(names
        .iter()
        .map(|n| {
            map[n]
                .iter()
                .map(|i| libc::sock_filter {
                    code: i.code,
                    jt: i.jt,
                    jf: i.jf,
                    k: i.k,
                })
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_profile_is_embedded() {
        let progs = Profile::Default.programs().unwrap();
        assert_eq!(progs.len(), 1);
        // A binary search, not a chain: a few hundred instructions at most.
        assert!(
            (50..600).contains(&progs[0].len()),
            "the filter has {} instructions",
            progs[0].len()
        );
        assert!(Profile::Unconfined.programs().unwrap().is_empty());
    }

    #[test]
    fn custom_profiles_compile_or_fail_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("p.json");
        std::fs::write(&good, r#"{"only":{"mismatch_action":"allow","match_action":{"errno":1},"filter":[{"syscall":"chmod"}]}}"#).unwrap();
        assert_eq!(
            Profile::parse(good.to_str().unwrap())
                .programs()
                .unwrap()
                .len(),
            1
        );
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, r#"{"x":{"mismatch_action":"allow","match_action":"allow","filter":[{"syscall":"nope"}]}}"#).unwrap();
        let e = Profile::parse(bad.to_str().unwrap())
            .programs()
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.json"), "{e}");
    }
}
