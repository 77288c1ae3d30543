//! Which platforms this host runs natively, which by emulation and how.
//!
//! The runtime knows interpreters and ELF magics; this module maps an OCI
//! platform to the qemu architecture that runs it, decides per RUN step
//! whether emulation is needed, and describes the host for `kiln info`.
//! It never mounts or registers anything itself.

use kiln_runtime::emulation::{Host, Mechanism};
use kiln_runtime::Emulator;
use serde::Serialize;

use crate::frontend::Platform;

/// Platforms kiln offers to emulate, in `kiln info` order.
pub const EMULATED: &[&str] = &[
    "linux/amd64",
    "linux/386",
    "linux/arm64",
    "linux/arm/v7",
    "linux/riscv64",
    "linux/s390x",
    "linux/ppc64le",
];

/// qemu's name for the architecture of `p`; `None` for one kiln cannot
/// emulate.
pub fn qemu_arch(p: &Platform) -> Option<&'static str> {
    if p.os != "linux" {
        return None;
    }
    Some(match p.architecture.as_str() {
        "amd64" => "x86_64",
        "386" => "i386",
        "arm64" => "aarch64",
        "arm" => "arm",
        "riscv64" => "riscv64",
        "s390x" => "s390x",
        "ppc64le" => "ppc64le",
        _ => return None,
    })
}

/// Whether the host runs binaries of `p` without an emulator.
pub fn is_native(p: &Platform) -> bool {
    let host = Platform::host();
    p.os == host.os
        && (p.architecture == host.architecture
            || (host.architecture == "amd64" && p.architecture == "386"))
}

/// Errors of choosing an emulator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("a RUN step for {platform} needs emulation, and kiln knows no qemu interpreter for it; build for linux/amd64, linux/arm64, linux/arm/v7, linux/riscv64, linux/s390x, linux/ppc64le or linux/386")]
    Unknown { platform: String },
    #[error("a RUN step for {platform}")]
    Unavailable {
        platform: String,
        source: kiln_runtime::Error,
    },
}

/// The emulators a RUN step for `p` needs (none when native), checked now
/// so a missing piece fails before the step starts.
pub fn emulators_for(p: &Platform) -> Result<Vec<Emulator>, Error> {
    if is_native(p) {
        return Ok(Vec::new());
    }
    let unknown = || Error::Unknown {
        platform: p.to_string(),
    };
    let emu = qemu_arch(p)
        .and_then(Emulator::host_qemu)
        .ok_or_else(unknown)?;
    Host::current()
        .mechanism(&emu)
        .map_err(|source| Error::Unavailable {
            platform: p.to_string(),
            source,
        })?;
    Ok(vec![emu])
}

/// One platform as `kiln info` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PlatformSupport {
    pub platform: String,
    /// `native`, `binfmt in user namespace`, `host binfmt registration`
    /// or `missing`
    pub how: String,
    /// the interpreter, when emulated
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interpreter: Option<String>,
    /// what to do about a missing one
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

/// Every platform of [`EMULATED`] plus the host's, and how each runs.
pub fn host_support() -> Vec<PlatformSupport> {
    let host = Host::current();
    let mut out = Vec::new();
    let mut all: Vec<Platform> = vec![Platform::host()];
    for s in EMULATED {
        let p = Platform::parse(s).expect("a valid platform literal");
        if !all.contains(&p) {
            all.push(p);
        }
    }
    for p in all {
        if is_native(&p) {
            out.push(PlatformSupport {
                platform: p.to_string(),
                how: "native".into(),
                interpreter: None,
                fix: None,
            });
            continue;
        }
        let Some(emu) = qemu_arch(&p).and_then(Emulator::host_qemu) else {
            continue;
        };
        let (how, fix) = match host.mechanism(&emu) {
            Ok(Mechanism::UserNamespace) => {
                ("emulated: binfmt_misc in the step's user namespace", None)
            }
            Ok(Mechanism::HostRegistration) => {
                ("emulated: the host's binfmt_misc registration", None)
            }
            Err(e) => ("missing", Some(crate::error_chain(&e))),
        };
        out.push(PlatformSupport {
            platform: p.to_string(),
            how: how.into(),
            interpreter: Some(emu.interpreter.display().to_string()),
            fix,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_is_native_and_maps_to_qemu() {
        assert!(is_native(&Platform::host()));
        let arm = Platform::parse("linux/arm64").unwrap();
        assert_eq!(qemu_arch(&arm), Some("aarch64"));
        assert_eq!(
            qemu_arch(&Platform::parse("linux/arm/v7").unwrap()),
            Some("arm")
        );
        assert_eq!(qemu_arch(&Platform::parse("windows/amd64").unwrap()), None);
        if Platform::host().architecture == "amd64" {
            assert!(!is_native(&arm));
            assert!(emulators_for(&Platform::host()).unwrap().is_empty());
        }
    }

    #[test]
    fn unknown_architecture_is_named() {
        let p = Platform::parse("linux/mips64le").unwrap();
        if !is_native(&p) {
            let e = emulators_for(&p).unwrap_err().to_string();
            assert!(e.contains("linux/mips64le"), "{e}");
        }
    }
}
