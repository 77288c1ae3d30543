//! Mount one writable view from a script (the benchmark uses it) and serve
//! it until SIGINT or SIGTERM, then unmount so that upper is complete.
//!
//! usage: mount-view fuse|overlay TARGET UPPER WORK [LOWER (topmost first)...]
//!
//! Run it inside a user and mount namespace (e.g. `unshare -rm --map-auto`).
//! It prints "ready" on stdout once the view is mounted.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context};
use kiln_snapshotter::backend::{fuse, overlay, ViewSpec};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() -> anyhow::Result<()> {
    kiln_snapshotter::backend::fuse::serve_if_asked();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        bail!("usage: mount-view fuse|overlay TARGET UPPER WORK [LOWER...]");
    }
    let spec = ViewSpec {
        target: PathBuf::from(&args[1]),
        upper: PathBuf::from(&args[2]),
        work: PathBuf::from(&args[3]),
        lowers: args[4..].iter().map(PathBuf::from).collect(),
    };
    let view = match args[0].as_str() {
        "fuse" => fuse::mount(&spec).context("mount fuse view")?,
        "overlay" => overlay::mount(&spec).context("mount overlay view")?,
        other => bail!("unknown backend {other}: use fuse or overlay"),
    };
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    println!("ready");
    std::io::stdout().flush()?;
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    drop(view);
    Ok(())
}
