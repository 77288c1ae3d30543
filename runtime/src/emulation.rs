//! Running binaries of a foreign architecture through qemu-user.
//!
//! Since Linux 6.7 a binfmt_misc instance can be mounted inside a user
//! namespace, and its registrations apply only to the processes of that
//! namespace. The sandbox child mounts one over the fresh
//! `/proc/sys/fs/binfmt_misc`, registers each [`Emulator`] with flag `F`
//! (the kernel opens the interpreter at registration, in the host's mount
//! namespace, so it need not exist in the image), then makes the mount
//! read-only before pivot_root and seccomp. The instance lives as long as
//! that mount: a detached staging mount was tried and loses its entries
//! when the last reference goes, so the mount stays where the kernel
//! expects it.
//!
//! This module owns the table of ELF magics, the choice between the
//! sandbox's own instance and a host registration (kernels before 6.7),
//! and the errors that name what is missing. It never mounts anything:
//! that is the child's job.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Where Debian's qemu-user-static installs its interpreters.
pub const DEFAULT_QEMU_DIR: &str = "/usr/bin";
/// Overrides [`DEFAULT_QEMU_DIR`] (tests, or a qemu built elsewhere).
pub const QEMU_DIR_ENV: &str = "KILN_QEMU_DIR";

/// One foreign architecture's interpreter, as binfmt_misc registers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emulator {
    /// registration name, `qemu-aarch64`
    pub name: String,
    /// ELF header bytes to match, `\xNN`-escaped as binfmt_misc reads them
    pub magic: String,
    /// mask applied before comparing, same escaping
    pub mask: String,
    /// absolute host path of a statically linked interpreter
    pub interpreter: PathBuf,
}

/// qemu-binfmt-conf.sh's values (the same Debian ships in
/// /usr/share/binfmts), used when that directory is absent.
const BUILTIN: &[(&str, &str, &str)] = &[
    (
        "aarch64",
        r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00",
        r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff",
    ),
    (
        "arm",
        r"\x7f\x45\x4c\x46\x01\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x28\x00",
        r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff",
    ),
    (
        "riscv64",
        r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xf3\x00",
        r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff",
    ),
    (
        "s390x",
        r"\x7f\x45\x4c\x46\x02\x02\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x16",
        r"\xff\xff\xff\xff\xff\xff\xff\xfc\xff\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff",
    ),
    (
        "ppc64le",
        r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x15\x00",
        r"\xff\xff\xff\xff\xff\xff\xff\xfc\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\x00",
    ),
    (
        "x86_64",
        r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x3e\x00",
        r"\xff\xff\xff\xff\xff\xfe\xfe\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff",
    ),
    (
        "i386",
        r"\x7f\x45\x4c\x46\x01\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x03\x00",
        r"\xff\xff\xff\xff\xff\xfe\xfe\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff",
    ),
];

impl Emulator {
    /// The emulator for qemu's architecture name `arch` (`aarch64`, `arm`,
    /// `riscv64`, ...) in `qemu_dir`, with magic and mask from
    /// `binfmts_dir` (Debian's /usr/share/binfmts) when it describes
    /// `arch`, else from the built-in table. `None` when kiln knows no
    /// magic for `arch`. The interpreter is not checked here.
    pub fn qemu(arch: &str, qemu_dir: &Path, binfmts_dir: &Path) -> Option<Emulator> {
        let name = format!("qemu-{arch}");
        let (magic, mask) = std::fs::read_to_string(binfmts_dir.join(&name))
            .ok()
            .and_then(|text| parse_binfmts(&text))
            .or_else(|| {
                BUILTIN
                    .iter()
                    .find(|(a, _, _)| *a == arch)
                    .map(|(_, m, k)| (m.to_string(), k.to_string()))
            })?;
        Some(Emulator {
            interpreter: qemu_dir.join(format!("{name}-static")),
            name,
            magic,
            mask,
        })
    }

    /// [`Emulator::qemu`] with the host's directories (`$KILN_QEMU_DIR`
    /// or /usr/bin, and /usr/share/binfmts).
    pub fn host_qemu(arch: &str) -> Option<Emulator> {
        let dir = std::env::var_os(QEMU_DIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_QEMU_DIR));
        Emulator::qemu(arch, &dir, Path::new("/usr/share/binfmts"))
    }

    /// The line written to binfmt_misc's `register`: match by magic at
    /// offset 0, flag `F` (open the interpreter now, so the image need
    /// not contain it).
    pub fn register_line(&self) -> String {
        format!(
            ":{}:M:0:{}:{}:{}:F",
            self.name,
            self.magic,
            self.mask,
            self.interpreter.display()
        )
    }
}

/// `magic` and `mask` of a Debian binfmts file (offset 0 only).
fn parse_binfmts(text: &str) -> Option<(String, String)> {
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ').map(str::trim))
            .map(str::to_string)
    };
    if field("offset").is_some_and(|o| o != "0") {
        return None;
    }
    Some((field("magic")?, field("mask")?))
}

/// How a host runs an emulator's binaries in a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mechanism {
    /// the sandbox's own binfmt_misc instance (Linux >= 6.7)
    UserNamespace,
    /// a registration in the host's binfmt_misc, used as it is
    HostRegistration,
}

/// What [`Host::mechanism`] needs to know about the host, injected so the
/// decision is testable without a particular kernel.
#[derive(Debug, Clone)]
pub struct Host {
    /// `uname -r`
    pub kernel_release: String,
    /// the host's binfmt_misc directory (/proc/sys/fs/binfmt_misc)
    pub binfmt_dir: PathBuf,
}

impl Host {
    /// This machine.
    pub fn current() -> Host {
        Host {
            kernel_release: kiln_sys::kernel_release().to_string(),
            binfmt_dir: PathBuf::from("/proc/sys/fs/binfmt_misc"),
        }
    }

    /// Whether the kernel mounts binfmt_misc in a user namespace (6.7+).
    pub fn binfmt_in_userns(&self) -> bool {
        crate::sys::kernel_at_least(&self.kernel_release, (6, 7))
    }

    /// Whether the host's binfmt_misc has `name` registered and enabled.
    pub fn has_registration(&self, name: &str) -> bool {
        std::fs::read_to_string(self.binfmt_dir.join(name))
            .is_ok_and(|s| s.lines().next() == Some("enabled"))
    }

    /// How `emu` runs here, or the error naming what is missing: the
    /// interpreter (`apt-get install qemu-user-static`), or a kernel that
    /// allows binfmt_misc in a user namespace.
    pub fn mechanism(&self, emu: &Emulator) -> Result<Mechanism> {
        if !emu.interpreter.is_file() {
            return Err(Error::EmulatorMissing {
                name: emu.name.clone(),
                interpreter: emu.interpreter.clone(),
            });
        }
        if self.binfmt_in_userns() {
            return Ok(Mechanism::UserNamespace);
        }
        if self.has_registration(&emu.name) {
            return Ok(Mechanism::HostRegistration);
        }
        Err(Error::EmulationUnavailable {
            name: emu.name.clone(),
            kernel: self.kernel_release.clone(),
        })
    }

    /// The `register` lines the sandbox child writes for `emulators`
    /// (none for those the host's registrations already serve).
    pub fn register_lines(&self, emulators: &[Emulator]) -> Result<Vec<CString>> {
        let mut lines = Vec::new();
        for emu in emulators {
            if self.mechanism(emu)? == Mechanism::UserNamespace {
                lines.push(
                    CString::new(emu.register_line()).map_err(|_| Error::NulByte {
                        what: format!("the binfmt_misc registration of {}", emu.name),
                    })?,
                );
            }
        }
        Ok(lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(release: &str, dir: &Path) -> Host {
        Host {
            kernel_release: release.into(),
            binfmt_dir: dir.to_path_buf(),
        }
    }

    #[test]
    fn kernel_versions() {
        let d = Path::new("/nonexistent");
        assert!(host("6.7.0", d).binfmt_in_userns());
        assert!(host("6.18.44-fc-v595", d).binfmt_in_userns());
        assert!(host("7.0", d).binfmt_in_userns());
        assert!(!host("6.6.30-generic", d).binfmt_in_userns());
        assert!(!host("5.15.0", d).binfmt_in_userns());
    }

    #[test]
    fn debian_file_wins_over_builtin() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(
            t.path().join("qemu-aarch64"),
            "package qemu-user-static\ninterpreter /x\nmagic \\x01\\x02\noffset 0\nmask \\xff\\xff\n",
        )
        .unwrap();
        let e = Emulator::qemu("aarch64", Path::new("/q"), t.path()).unwrap();
        assert_eq!(
            e.register_line(),
            r":qemu-aarch64:M:0:\x01\x02:\xff\xff:/q/qemu-aarch64-static:F"
        );
        let b = Emulator::qemu("riscv64", Path::new("/q"), t.path()).unwrap();
        assert!(b.magic.ends_with(r"\xf3\x00"));
        assert!(Emulator::qemu("vax", Path::new("/q"), t.path()).is_none());
    }

    #[test]
    fn missing_pieces_are_named() {
        let t = tempfile::tempdir().unwrap();
        let emu = Emulator::qemu("aarch64", t.path(), t.path()).unwrap();
        let err = host("6.8", t.path()).mechanism(&emu).unwrap_err();
        assert!(
            err.to_string().contains("apt-get install qemu-user-static"),
            "{err}"
        );
        std::fs::write(&emu.interpreter, b"").unwrap();
        assert_eq!(
            host("6.8", t.path()).mechanism(&emu).unwrap(),
            Mechanism::UserNamespace
        );
        let err = host("6.1", t.path()).mechanism(&emu).unwrap_err();
        assert!(err.to_string().contains("6.7"), "{err}");
        std::fs::write(t.path().join("qemu-aarch64"), "enabled\ninterpreter /x\n").unwrap();
        assert_eq!(
            host("6.1", t.path()).mechanism(&emu).unwrap(),
            Mechanism::HostRegistration
        );
        assert!(host("6.1", t.path())
            .register_lines(&[emu])
            .unwrap()
            .is_empty());
    }
}
