//! `kiln build` on a real Debian root filesystem made with debootstrap:
//! dpkg, useradd, USER switching to a subordinate uid, a tool that writes
//! many files, as an unprivileged user.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_vm_tests::{
    give_to_test_user, kiln, missing_prerequisite, run_checked, running_as_root, test_dir,
};

/// A tar of a minimal Debian bookworm made with debootstrap (root only),
/// kept in /var/tmp between runs on one machine.
fn debian_tar() -> Option<PathBuf> {
    let tar = PathBuf::from("/var/tmp/kiln-debian-bookworm-minbase.tar");
    if tar.exists() {
        return Some(tar);
    }
    if !running_as_root() {
        return None;
    }
    assert!(
        Path::new("/usr/sbin/debootstrap").exists(),
        "debootstrap is missing: run scripts/setup-host.sh (apt-get install debootstrap)"
    );
    let dir = PathBuf::from(format!("/var/tmp/kiln-debootstrap-{}", std::process::id()));
    run_checked(
        Command::new("debootstrap")
            .args(["--variant=minbase", "bookworm"])
            .arg(&dir)
            .arg("http://deb.debian.org/debian"),
    );
    let tmp = tar.with_extension("tar.partial");
    run_checked(
        Command::new("tar")
            .arg("-C")
            .arg(&dir)
            .arg("-cf")
            .arg(&tmp)
            .arg("."),
    );
    std::fs::rename(&tmp, &tar).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    Some(tar)
}

/// A project at `test_dir(name)` with `files` (relative path, content) in
/// its context and the Debian tree imported as `debian-local:bookworm` into
/// its state directory; `None` (after saying why) when the tree cannot be
/// made. Returns the project directory and the state directory.
fn debian_project(name: &str, files: &[(PathBuf, Vec<u8>)]) -> Option<(PathBuf, String)> {
    let Some(tar) = debian_tar() else {
        missing_prerequisite("making the Debian rootfs with debootstrap needs root");
        return None;
    };
    let dir = test_dir(name);
    let staged = dir.join("debian.tar");
    std::fs::copy(&tar, &staged).unwrap();
    for (rel, content) in files {
        let path = dir.join("ctx").join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    give_to_test_user(&dir);
    let state = dir.join("state").display().to_string();
    let o = kiln([
        "--root",
        &state,
        "import",
        &staged.display().to_string(),
        "-t",
        "debian-local:bookworm",
    ])
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Some((dir, state))
}

#[test]
fn builds_on_a_debootstrapped_debian() {
    let dockerfile = "FROM debian-local:bookworm\n\
         RUN dpkg-query -W -f '${Package}\\n' | wc -l > /packages && useradd -m -u 1000 builder\n\
         USER builder\n\
         WORKDIR /home/builder\n\
         RUN id -u > uid && echo ok > owned-by-builder && mkdir -p many && for i in $(seq 1 500); do echo $i > many/$i; done\n\
         USER root\n\
         RUN test \"$(id -u)\" = 0 && chown builder /home/builder/uid\n\
         USER builder\n\
         CMD [\"cat\", \"/home/builder/uid\"]\n";
    let Some((dir, state)) =
        debian_project("build-debian", &[("Dockerfile".into(), dockerfile.into())])
    else {
        return;
    };
    // The backend `auto` picks (kernel overlay here), then the FUSE view
    // kiln serves itself: dpkg, useradd (lock files, renames, O_TRUNC
    // rewrites of /etc files) and USER switching through both give an
    // image with the same files.
    let auto = build_and_check(&dir, &state, "auto");
    let fuse = build_and_check(&dir, &state, "fuse");
    assert_eq!(auto, fuse, "the fuse view built a different file tree");
}

/// Build the Debian project with `--snapshotter SNAPSHOTTER` (no cache),
/// check the image, and return the type, mode, owner and path of every
/// entry of its root filesystem.
fn build_and_check(dir: &Path, state: &str, snapshotter: &str) -> Vec<String> {
    let tag = format!("debian-built-{snapshotter}");
    let rootfs = dir.join(format!("rootfs-{snapshotter}.tar"));
    let o = kiln([
        "--root",
        state,
        "build",
        "--no-cache",
        "--snapshotter",
        snapshotter,
        "--progress",
        "plain",
        "-t",
        &tag,
        "-o",
        &format!("type=tar,dest={}", rootfs.display()),
        &dir.join("ctx").display().to_string(),
    ])
    .output()
    .unwrap();
    assert!(
        o.status.success(),
        "{snapshotter}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Read the result back as the image has it: owners in the tar.
    let listing = run_checked(Command::new("tar").arg("-tvf").arg(&rootfs));
    let listing = String::from_utf8_lossy(&listing.stdout);
    let line = listing
        .lines()
        .find(|l| l.ends_with("home/builder/owned-by-builder"))
        .expect("file in the image");
    assert!(
        line.contains("1000/1000") || line.contains("builder/builder"),
        "{snapshotter}: {line}"
    );
    let o = kiln(["--root", state, "run", &tag]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "1000\n",
        "{snapshotter}: the image's CMD runs as USER builder"
    );
    let o = kiln([
        "--root",
        state,
        "run",
        &tag,
        "--",
        "sh",
        "-c",
        "cat /packages; ls /home/builder/many | wc -l; grep -c '^builder:' /etc/passwd /etc/group",
    ])
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    let mut lines = text.lines();
    let packages: u32 = lines.next().unwrap_or("0").trim().parse().unwrap_or(0);
    assert!(packages > 50, "dpkg lists the minbase packages: {text}");
    assert_eq!(lines.next().map(str::trim), Some("500"), "{snapshotter}");
    assert_eq!(
        lines.collect::<Vec<_>>(),
        ["/etc/passwd:1", "/etc/group:1"],
        "{snapshotter}: useradd wrote its entries"
    );
    // type and mode, owner, path: sizes and times may differ (logs,
    // timestamps written into files)
    listing
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            format!("{} {} {}", f[0], f[1], f[5..].join(" "))
        })
        .collect()
}

/// `apt-get update && apt-get install` of a small package, in a RUN step
/// with the default network (`sandbox`), as the unprivileged test user,
/// from the Debian mirror this machine's apt is configured with (its
/// sources are copied into the image): DNS through the machine's own
/// resolver, HTTP out through the user-mode stack.
#[test]
fn apt_get_installs_from_the_machine_mirror_with_the_default_network() {
    // the machine's apt sources, as its apt reads them
    let mut files: Vec<(PathBuf, Vec<u8>)> = vec![(
        "apt/sources.list".into(),
        std::fs::read("/etc/apt/sources.list").unwrap_or_default(),
    )];
    for e in std::fs::read_dir("/etc/apt/sources.list.d")
        .into_iter()
        .flatten()
        .flatten()
    {
        let rel = Path::new("apt/sources.list.d").join(e.file_name());
        files.push((rel, std::fs::read(e.path()).unwrap()));
    }
    files.push((
        "Dockerfile".into(),
        "FROM debian-local:bookworm\n\
         COPY apt/ /etc/apt/\n\
         RUN apt-get update && apt-get install -y --no-install-recommends jq \\\n\
             && echo '{\"a\": [1, 2]}' | jq -c '.a | add' > /jq-out\n"
            .into(),
    ));
    let Some((dir, state)) = debian_project("build-debian-apt", &files) else {
        return;
    };
    let out = dir.join("out");
    let o = kiln([
        "--root",
        &state,
        "build",
        "--progress",
        "plain",
        "-o",
        &format!("type=local,dest={}", out.display()),
        &dir.join("ctx").display().to_string(),
    ])
    .output()
    .unwrap();
    assert!(
        o.status.success(),
        "apt-get in a RUN step with the default network failed (no DNS or no route to the mirror?):\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(out.join("jq-out")).unwrap_or_default(),
        "3\n",
        "jq was installed and ran"
    );
    assert!(out.join("usr/bin/jq").exists(), "jq is in the image");
}
