//! Process ownership of scratch files: each open store registers an owner
//! file, `flock`ed for as long as the store is open (the kernel drops the
//! lock when the process dies, even by SIGKILL). Temp files and directories
//! carry their owner's name, so "is this leftover's writer alive?" is one
//! non-blocking flock, with no window between creating a temp file and
//! locking it.
//!
//! An owner file is created under a `.new-` name, locked, then renamed into
//! place, so a cleaner never sees an unlocked live owner. This module never
//! removes anything but owner files; callers remove their own leftovers.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::sys;

/// `.new-` owner files older than this are a creator that died between
/// create and rename.
const NEW_GRACE: Duration = Duration::from_secs(600);

/// A live owner; its lock is released when dropped or when the process dies.
#[derive(Debug)]
pub struct Owner {
    dir: PathBuf,
    name: String,
    _file: File,
}

impl Owner {
    /// Register a new owner in `dir` (created if missing).
    pub fn new(dir: &Path) -> io::Result<Owner> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        fs::create_dir_all(dir)?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let name = format!(
            "o{}.{}.{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            nanos
        );
        let new = dir.join(format!(".new-{name}"));
        let file = OpenOptions::new().create_new(true).write(true).open(&new)?;
        sys::flock(file.as_fd(), true, true)?;
        fs::rename(&new, dir.join(&name))?;
        Ok(Owner {
            dir: dir.to_path_buf(),
            name,
            _file: file,
        })
    }

    /// The owner's name, to embed in temp names (no `-` inside).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        let _ = fs::remove_file(self.dir.join(&self.name));
    }
}

/// Whether the owner `name` registered in `dir` is alive.
pub fn is_alive(dir: &Path, name: &str) -> bool {
    if name.is_empty() || name.contains('/') {
        return false;
    }
    match File::open(dir.join(name)) {
        // lock taken: nobody holds it
        Ok(f) => !sys::flock(f.as_fd(), true, false).unwrap_or(true),
        Err(_) => false,
    }
}

/// The owner part of a temp name `"<owner>-<rest>"`.
pub fn owner_of(temp_name: &str) -> &str {
    temp_name.split('-').next().unwrap_or("")
}

/// Remove owner files of dead owners (and abandoned `.new-` files).
pub fn clean(dir: &Path) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".new-") {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > NEW_GRACE);
            if old {
                let _ = fs::remove_file(e.path());
            }
        } else if !is_alive(dir, &name) {
            let _ = fs::remove_file(e.path());
        }
    }
    Ok(())
}
