//! The FUSE view at scale, end to end: one RUN step creates 200,000 files
//! and lists them, through `--snapshotter fuse`, as the unprivileged test
//! user under the default soft limit of 1024 open files, while the test
//! samples how many descriptors the kiln process (which serves the view)
//! holds. The server must keep a bounded number whatever the number of
//! files the kernel remembers (an `npm install` makes 100,000).

use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kiln_vm_tests::{busybox_rootfs, give_to_test_user, kiln, test_dir};

/// Files the step creates.
const FILES: usize = 200_000;
/// The soft RLIMIT_NOFILE most distributions give a user.
const SOFT_NOFILE: u64 = 1024;
/// What the server may hold at most: its fixed descriptors and a small
/// cache, far below the limit.
const CAP: usize = 256;

fn open_fds(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count())
}

#[test]
fn fuse_view_serves_200k_files_with_bounded_descriptors() {
    let dir = test_dir("fuse-scale");
    busybox_rootfs(&dir.join("ctx/rootfs"));
    std::fs::write(
        dir.join("ctx/Dockerfile"),
        format!(
            "FROM scratch\nCOPY rootfs/ /\n\
             RUN mkdir /d && cd /d && seq 1 {FILES} | xargs touch && ls /d | wc -l > /count\n"
        ),
    )
    .unwrap();
    give_to_test_user(&dir);
    let out = dir.join("out");
    let mut cmd = kiln([
        "--root".to_string(),
        dir.join("state").display().to_string(),
        "build".into(),
        "--snapshotter".into(),
        "fuse".into(),
        "--progress".into(),
        "plain".into(),
        "-o".into(),
        format!("type=local,dest={}", out.display()),
        dir.join("ctx").display().to_string(),
    ]);
    // SAFETY: setrlimit is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            lim.rlim_cur = SOFT_NOFILE.min(lim.rlim_max);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kiln");
    // setpriv execs kiln in place: the child's pid is kiln's
    let pid = child.id();
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicUsize::new(0));
    let samples = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (done, peak, samples) = (done.clone(), peak.clone(), samples.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                if let Some(n) = open_fds(pid) {
                    peak.fetch_max(n, Ordering::SeqCst);
                    samples.fetch_add(1, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let o = child.wait_with_output().unwrap();
    done.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "the build failed (EMFILE from the view?):\n{}",
        err.lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    assert_eq!(
        std::fs::read_to_string(out.join("count")).unwrap().trim(),
        FILES.to_string(),
        "the step saw every file"
    );
    let (peak, samples) = (peak.load(Ordering::SeqCst), samples.load(Ordering::SeqCst));
    assert!(samples > 10, "too few samples of the server ({samples})");
    assert!(
        peak < CAP,
        "the FUSE server held {peak} descriptors (cap {CAP}, soft limit {SOFT_NOFILE})"
    );
    eprintln!("peak {peak} descriptors over {samples} samples");
}
