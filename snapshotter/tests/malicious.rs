//! Malicious and damaged layers: each is refused with an error naming the
//! entry, and nothing outside the target changes (canary files checked).
//! Also the legitimate special cases apply keeps: whiteouts, opaque
//! directories, setuid bits, sparse files, skipped device nodes.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use common::*;
use kiln_snapshotter::apply::{apply, Error};
use kiln_snapshotter::targuard::Refused;

/// A tar built entry by entry with raw header fields, so it can hold what
/// no honest tar writer produces.
#[derive(Default)]
struct RawTar(Vec<u8>);

impl RawTar {
    fn entry(
        &mut self,
        name: &[u8],
        kind: tar::EntryType,
        link: &[u8],
        data: &[u8],
        mode: u32,
    ) -> &mut Self {
        let mut h = tar::Header::new_ustar();
        {
            let u = h.as_ustar_mut().unwrap();
            u.name[..name.len()].copy_from_slice(name);
            u.linkname[..link.len()].copy_from_slice(link);
        }
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.0.extend_from_slice(h.as_bytes());
        self.0.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.0.extend(vec![0u8; pad]);
        self
    }
    fn owned_file(&mut self, name: &str, uid: u64) -> &mut Self {
        self.file(name, b"x");
        let at = self.0.len() - 1024;
        let mut h = tar::Header::new_ustar();
        h.as_mut_bytes().copy_from_slice(&self.0[at..at + 512]);
        h.set_uid(uid);
        h.set_cksum();
        self.0[at..at + 512].copy_from_slice(h.as_bytes());
        self
    }
    fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.entry(name.as_bytes(), tar::EntryType::Regular, b"", data, 0o644)
    }
    fn dir(&mut self, name: &str) -> &mut Self {
        self.entry(name.as_bytes(), tar::EntryType::Directory, b"", b"", 0o755)
    }
    fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(
            name.as_bytes(),
            tar::EntryType::Symlink,
            target.as_bytes(),
            b"",
            0o777,
        )
    }
    fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(
            name.as_bytes(),
            tar::EntryType::Link,
            target.as_bytes(),
            b"",
            0o644,
        )
    }
    fn device(&mut self, name: &str, kind: tar::EntryType, major: u32, minor: u32) -> &mut Self {
        self.entry(name.as_bytes(), kind, b"", b"", 0o666);
        // patch the device numbers into the header just written
        let at = self.0.len() - 512;
        let mut h = tar::Header::new_ustar();
        h.as_mut_bytes().copy_from_slice(&self.0[at..]);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        h.set_cksum();
        self.0[at..].copy_from_slice(h.as_bytes());
        self
    }
    fn pax(&mut self, records: &[u8]) -> &mut Self {
        self.entry(
            b"PaxHeaders/x",
            tar::EntryType::XHeader,
            b"",
            records,
            0o644,
        )
    }
    fn finish(&mut self) -> Vec<u8> {
        let mut v = self.0.clone();
        v.extend(vec![0u8; 1024]);
        v
    }
}

/// A sandbox: `host/` with canaries standing for the host, `target/` the
/// layer directory being filled.
struct Case {
    _dir: tempfile::TempDir,
    host: std::path::PathBuf,
    target: std::path::PathBuf,
    before: Vec<String>,
}

impl Case {
    fn new() -> Case {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host");
        let target = dir.path().join("layers/l1/target");
        fs::create_dir_all(host.join("etc")).unwrap();
        fs::write(host.join("passwd"), b"canary passwd").unwrap();
        fs::write(host.join("etc/shadow"), b"canary shadow").unwrap();
        fs::create_dir_all(&target).unwrap();
        let before = listing(dir.path());
        Case {
            before,
            host,
            target,
            _dir: dir,
        }
    }
    fn apply(&self, tar: &[u8]) -> Result<kiln_snapshotter::apply::ApplyReport, Error> {
        apply(tar, &self.target, &[])
    }
    /// Everything outside `target` is as it was.
    fn host_unchanged(&self) {
        let root = self.host.parent().unwrap();
        let now: Vec<String> = listing(root)
            .into_iter()
            .filter(|l| !l.starts_with("layers/l1/target/"))
            .collect();
        let before: Vec<String> = self
            .before
            .iter()
            .filter(|l| !l.starts_with("layers/l1/target/"))
            .cloned()
            .collect();
        // the target directory's own mtime may change; compare the rest
        let strip = |v: Vec<String>| -> Vec<String> {
            v.into_iter()
                .filter(|l| !l.starts_with("layers/l1/target "))
                .collect()
        };
        assert_eq!(strip(now), strip(before), "the host must be unchanged");
        assert_eq!(
            fs::read(self.host.join("passwd")).unwrap(),
            b"canary passwd"
        );
    }
}

fn expect_err(case: &Case, tar: &[u8], want: impl Fn(&Error) -> bool, mention: &str) {
    let err = case.apply(tar).expect_err("the layer must be refused");
    let msg = err.to_string();
    assert!(want(&err), "unexpected error kind: {msg}");
    assert!(
        msg.contains(mention),
        "error {msg:?} should name {mention:?}"
    );
    case.host_unchanged();
}

fn body() {
    // tar-slip
    let c = Case::new();
    let tar = RawTar::default()
        .file("ok", b"1")
        .file("../../../host/passwd", b"pwned")
        .finish();
    expect_err(
        &c,
        &tar,
        |e| matches!(e, Error::DotDot { .. }),
        "../../../host/passwd",
    );
    let tar = RawTar::default().file("a/../../x", b"pwned").finish();
    expect_err(&c, &tar, |e| matches!(e, Error::DotDot { .. }), "a/../../x");

    // absolute path
    let c = Case::new();
    let abs = c.host.join("passwd").display().to_string();
    let tar = RawTar::default().file(&abs, b"pwned").finish();
    expect_err(&c, &tar, |e| matches!(e, Error::Absolute { .. }), &abs);

    // symlink to a host directory, then a file through it
    let c = Case::new();
    let host = c.host.display().to_string();
    let tar = RawTar::default()
        .symlink("etc", &host)
        .file("etc/passwd", b"pwned")
        .finish();
    expect_err(
        &c,
        &tar,
        |e| matches!(e, Error::ThroughSymlink { .. }),
        "etc/passwd",
    );
    assert!(fs::symlink_metadata(c.target.join("etc"))
        .unwrap()
        .file_type()
        .is_symlink());

    // the literal case: a symlink to /etc, then /etc/passwd through it
    let c = Case::new();
    let tar = RawTar::default()
        .symlink("etc", "/etc")
        .file("etc/passwd", b"pwned")
        .finish();
    expect_err(
        &c,
        &tar,
        |e| matches!(e, Error::ThroughSymlink { .. }),
        "etc/passwd",
    );
    assert_ne!(fs::read("/etc/passwd").unwrap(), b"pwned");
    let tar = RawTar::default().hardlink("shadow", "/etc/shadow").finish();
    expect_err(
        &c,
        &tar,
        |e| matches!(e, Error::LinkOutside { .. }),
        "/etc/shadow",
    );

    // a -> .. then a/x/y
    let c = Case::new();
    let tar = RawTar::default()
        .symlink("a", "..")
        .file("a/x/y", b"pwned")
        .finish();
    expect_err(
        &c,
        &tar,
        |e| matches!(e, Error::ThroughSymlink { .. }),
        "a/x/y",
    );
    assert!(!c.target.parent().unwrap().join("x").exists());

    // a whiteout under a symlinked directory
    let c = Case::new();
    let tar = RawTar::default()
        .symlink("d", &host)
        .file("d/.wh.passwd", b"")
        .finish();
    expect_err(
        &c,
        &tar,
        |e| matches!(e, Error::ThroughSymlink { .. }),
        "d/.wh.passwd",
    );

    // hard links to a host file, and out of the layer
    let c = Case::new();
    let shadow = c.host.join("etc/shadow").display().to_string();
    let tar = RawTar::default().hardlink("sh", &shadow).finish();
    expect_err(&c, &tar, |e| matches!(e, Error::LinkOutside { .. }), "sh");
    let tar = RawTar::default()
        .hardlink("sh", "../../../host/passwd")
        .finish();
    expect_err(
        &c,
        &tar,
        |e| matches!(e, Error::LinkOutside { .. }),
        "../../../host/passwd",
    );
    let tar = RawTar::default().hardlink("sh", "missing").finish();
    expect_err(
        &c,
        &tar,
        |e| matches!(e, Error::LinkOutside { .. }),
        "missing",
    );

    // a later entry replaces a symlink instead of writing through it
    let c = Case::new();
    let passwd = c.host.join("passwd").display().to_string();
    let tar = RawTar::default()
        .symlink("x", &passwd)
        .file("x", b"replaced")
        .finish();
    c.apply(&tar).unwrap();
    assert_eq!(fs::read(c.target.join("x")).unwrap(), b"replaced");
    c.host_unchanged();

    // a huge PAX header
    let c = Case::new();
    let value = vec![b'a'; 2 << 20];
    let body = value.len() + "comment=".len() + 2;
    let mut total = body + 1;
    while body + total.to_string().len() != total {
        total = body + total.to_string().len();
    }
    let mut rec = format!("{total} comment=").into_bytes();
    rec.extend_from_slice(&value);
    rec.push(b'\n');
    let tar = RawTar::default()
        .file("before", b"1")
        .pax(&rec)
        .file("f", b"x")
        .finish();
    expect_err(
        &c,
        &tar,
        |e| {
            matches!(
                e,
                Error::Refused {
                    reason: Refused::Extension { kind: "PAX", .. },
                    ..
                }
            )
        },
        "after entry before",
    );

    // a truncated gzip stream
    let c = Case::new();
    let big: Vec<u8> = (0..1_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0])
        .collect();
    let tar = RawTar::default()
        .file("big", &big)
        .file("after", b"1")
        .finish();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    let cut = &gz[..gz.len() / 2];
    let err = c.apply(cut).expect_err("truncated gzip must fail");
    assert!(matches!(err, Error::Stream { .. }), "{err}");
    assert!(err.to_string().contains("big"), "{err}");
    c.host_unchanged();
    // the same stream with only the gzip trailer cut: caught at the end
    let c = Case::new();
    let err = c
        .apply(&gz[..gz.len() - 4])
        .expect_err("missing trailer must fail");
    assert!(matches!(err, Error::Stream { .. }), "{err}");

    // a plain tar cut inside an entry's data
    let c = Case::new();
    let tar = RawTar::default().file("big", &big).finish();
    let err = c
        .apply(&tar[..600_000])
        .expect_err("truncated tar must fail");
    assert!(matches!(err, Error::Stream { .. }), "{err}");
    assert!(err.to_string().contains("big"), "{err}");
    // a tar ending right after its last entry's data (as umoci 0.4 writes
    // them) is complete
    let c = Case::new();
    let tar = RawTar::default()
        .file("a", b"1")
        .file("last", b"1234567")
        .finish();
    c.apply(&tar[..512 * 3 + 7]).unwrap();
    assert_eq!(fs::read(c.target.join("last")).unwrap(), b"1234567");

    // an owner outside kiln's id range
    let c = Case::new();
    let tar = RawTar::default().owned_file("far", 100_000).finish();
    let err = c.apply(&tar).expect_err("unmapped owner must fail");
    assert!(matches!(err, Error::Unmapped { uid: 100_000, .. }), "{err}");
    assert!(err.to_string().contains("far"), "{err}");

    // a corrupt header: nothing after it is applied
    let c = Case::new();
    let mut tar = RawTar::default()
        .file("a", b"1")
        .file("b", b"2")
        .file("c", b"3")
        .finish();
    tar[1024 + 148] ^= 0x01; // b's checksum field
    let err = c.apply(&tar).expect_err("corrupt header must fail");
    assert!(matches!(err, Error::Header { .. }), "{err}");
    assert!(err.to_string().contains("after entry a"), "{err}");
    assert!(c.target.join("a").exists() && !c.target.join("c").exists());
    c.host_unchanged();
}

/// PAX records `key=value` with correct length prefixes.
fn pax_records(recs: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in recs {
        let body = k.len() + v.len() + 3;
        let mut total = body + 1;
        while body + total.to_string().len() != total {
            total = body + total.to_string().len();
        }
        out.extend_from_slice(format!("{total} {k}=").as_bytes());
        out.extend_from_slice(v);
        out.push(b'\n');
    }
    out
}

/// A v2 file capability granting CAP_NET_BIND_SERVICE, effective.
const CAP_V2: [u8; 20] = [1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

fn legit_body() {
    let c = Case::new();
    let xattr_recs = pax_records(&[
        ("SCHILY.xattr.security.capability", &CAP_V2),
        ("SCHILY.xattr.trusted.secret", b"x"),
        ("SCHILY.xattr.user.overlay.redirect", b"/etc"),
        ("SCHILY.xattr.user.mime", b"text/plain"),
    ]);
    let mut sparse = vec![0u8; 4 << 20];
    sparse[..5].copy_from_slice(b"begin");
    let n = sparse.len();
    sparse[n - 3..].copy_from_slice(b"end");
    let tar = RawTar::default()
        .dir("dev")
        .device("dev/null", tar::EntryType::Char, 1, 3)
        .device("dev/sda", tar::EntryType::Block, 8, 0)
        .entry(b"bin/su", tar::EntryType::Regular, b"", b"#!", 0o4755)
        .entry(b"bin/sg", tar::EntryType::Regular, b"", b"#!", 0o2755)
        .file("sparse", &sparse)
        .dir("opq")
        .file("opq/.wh..wh..opq", b"")
        .file(".wh.removed", b"")
        .entry(b"fifo", tar::EntryType::Fifo, b"", b"", 0o600)
        .file("target", b"t")
        .hardlink("hl", "target")
        .pax(&xattr_recs)
        .entry(b"bin/ping", tar::EntryType::Regular, b"", b"ELF", 0o755)
        .finish();
    let report = c.apply(&tar).unwrap();
    assert_eq!(report.skipped_devices, 2);
    assert_eq!(
        report.skipped_xattrs, 1,
        "trusted.* cannot be set in a user namespace"
    );
    let got = xattrs(&c.target.join("bin/ping"));
    let names: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        ["security.capability", "user.mime"],
        "overlay xattrs never come from a layer"
    );
    // the capability reads back as written, and diff writes it out again
    let p =
        std::ffi::CString::new(c.target.join("bin/ping").as_os_str().as_encoded_bytes()).unwrap();
    let mut cap = vec![0u8; 64];
    // SAFETY: buffer valid for its length; strings NUL-terminated.
    let n = unsafe {
        libc::lgetxattr(
            p.as_ptr(),
            c"security.capability".as_ptr(),
            cap.as_mut_ptr().cast(),
            64,
        )
    };
    assert_eq!(&cap[..usize::try_from(n).unwrap()], &CAP_V2);
    let tar_out = kiln_snapshotter::diff::write_tar(&c.target, Vec::new(), None).unwrap();
    let mut ar = tar::Archive::new(&tar_out[..]);
    let mut found = false;
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path_bytes().as_ref() == b"bin/ping" {
            for x in e.pax_extensions().unwrap().unwrap() {
                let x = x.unwrap();
                if x.key().unwrap() == "SCHILY.xattr.security.capability" {
                    assert_eq!(x.value_bytes(), &CAP_V2);
                    found = true;
                }
            }
        }
    }
    assert!(found, "diff keeps security.capability");
    assert!(
        report.warning().unwrap().contains("skipped 2 device node"),
        "{:?}",
        report.warning()
    );
    assert!(!c.target.join("dev/null").exists());
    assert_eq!(
        fs::metadata(c.target.join("bin/su")).unwrap().mode() & 0o7777,
        0o4755
    );
    assert_eq!(
        fs::metadata(c.target.join("bin/sg")).unwrap().mode() & 0o7777,
        0o2755
    );
    let m = fs::metadata(c.target.join("sparse")).unwrap();
    assert_eq!(m.len(), 4 << 20);
    assert!(
        m.blocks() * 512 < 64 * 1024,
        "sparse file kept holes: {} blocks",
        m.blocks()
    );
    assert_eq!(fs::read(c.target.join("sparse")).unwrap(), sparse);
    let wh = fs::symlink_metadata(c.target.join("removed")).unwrap();
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "whiteout is char 0:0"
    );
    assert_eq!(xattrs(&c.target.join("opq")), vec![]);
    let mut opaque = vec![0u8; 8];
    let p = std::ffi::CString::new(c.target.join("opq").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: buffers valid for their lengths; strings NUL-terminated.
    let n = unsafe {
        libc::lgetxattr(
            p.as_ptr(),
            c"user.overlay.opaque".as_ptr(),
            opaque.as_mut_ptr().cast(),
            8,
        )
    };
    assert_eq!(n, 1);
    assert_eq!(opaque[0], b'y');
    assert!(fs::symlink_metadata(c.target.join("fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert_eq!(
        fs::metadata(c.target.join("hl")).unwrap().ino(),
        fs::metadata(c.target.join("target")).unwrap().ino()
    );
    c.host_unchanged();
}

#[test]
fn malicious_layers_are_refused_and_the_host_is_unchanged() {
    if in_userns("malicious_layers_are_refused_and_the_host_is_unchanged") {
        body();
    }
}

#[test]
fn special_entries_apply_as_the_layer_format_says() {
    if in_userns("special_entries_apply_as_the_layer_format_says") {
        legit_body();
    }
}

#[test]
fn hard_link_to_a_lower_layer_file_is_copied_up() {
    if !in_userns("hard_link_to_a_lower_layer_file_is_copied_up") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lower = dir.path().join("lower");
    let upper = dir.path().join("upper");
    fs::create_dir_all(lower.join("bin")).unwrap();
    fs::create_dir_all(&upper).unwrap();
    fs::write(lower.join("bin/tool"), b"tool").unwrap();
    let tar = RawTar::default().hardlink("bin/alias", "bin/tool").finish();
    apply(&tar[..], &upper, std::slice::from_ref(&lower)).unwrap();
    // a parent that is a symlink in a lower layer is not written through
    std::os::unix::fs::symlink("usr/lib", lower.join("lib")).unwrap();
    let tar = RawTar::default().file("lib/libx.so", b"x").finish();
    let err = apply(&tar[..], &upper, std::slice::from_ref(&lower)).unwrap_err();
    assert!(matches!(err, Error::ThroughSymlink { .. }), "{err}");
    assert!(err.to_string().contains("lib/libx.so"), "{err}");
    // but a layer that replaces it with a directory first may fill it
    let tar = RawTar::default()
        .dir("lib")
        .file("lib/libx.so", b"x")
        .finish();
    apply(&tar[..], &upper, std::slice::from_ref(&lower)).unwrap();
    assert!(upper.join("lib/libx.so").is_file());
    let a = fs::metadata(upper.join("bin/alias")).unwrap();
    let t = fs::metadata(upper.join("bin/tool")).unwrap();
    assert_eq!(a.ino(), t.ino());
    assert_eq!(fs::read(upper.join("bin/alias")).unwrap(), b"tool");
    let _ = Path::new("");
}

/// A stream: one tar header declaring `size` bytes of GNU long name, then
/// zeros up to that size, made as they are read; counts what was read.
struct LongNameBomb {
    header: Vec<u8>,
    at: u64,
    len: u64,
    read: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl std::io::Read for LongNameBomb {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = usize::try_from(self.len - self.at).unwrap_or(usize::MAX);
        let n = buf.len().min(left);
        let at = usize::try_from(self.at).unwrap();
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = self.header.get(at + i).copied().unwrap_or(b'a');
        }
        self.at += n as u64;
        self.read
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

#[test]
fn a_long_name_header_is_refused_before_its_body_is_read() {
    let size: u64 = 256 << 20;
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::GNULongName);
    h.set_path("././@LongLink").unwrap();
    h.set_size(size);
    h.set_cksum();
    let read = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let bomb = LongNameBomb {
        header: h.as_bytes().to_vec(),
        at: 0,
        len: 512 + size,
        read: read.clone(),
    };
    let dir = tempfile::tempdir().unwrap();
    let err = apply(bomb, dir.path(), &[]).expect_err("must be refused");
    assert!(
        matches!(
            err,
            Error::Refused {
                reason: Refused::Extension {
                    kind: "GNU long name",
                    ..
                },
                ..
            }
        ),
        "{err}"
    );
    // what was read is apply's read-ahead, not the declared body
    let read = read.load(std::sync::atomic::Ordering::Relaxed);
    assert!(read <= 4 << 20, "{read} bytes read for a refused header");
}

#[test]
fn layer_limits_stop_the_stream() {
    use kiln_snapshotter::targuard::Limits;
    let mut tar = RawTar::default();
    for i in 0..50 {
        tar.file(&format!("f{i}"), b"x");
    }
    let tar = tar.finish();
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_bytes: u64::MAX,
        max_entries: 10,
    };
    let err = kiln_snapshotter::apply::apply_limited(&tar[..], dir.path(), &[], limits)
        .expect_err("entries over the limit");
    assert!(
        matches!(
            err,
            Error::Refused {
                reason: Refused::TooManyEntries { limit: 10 },
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("after entry f9"), "{err}");
}
