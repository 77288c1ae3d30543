//! Behaviour of the view backends beyond what overlayfs can serve as an
//! oracle for: fuse hard links and inode numbers, unmount flushing every
//! write, large and concurrent I/O, kernel overlay with more layers than one
//! option page holds, views of no lower layer, and the `auto` probe.
//!
//! Each outer test re-executes this binary under `in_userns` (the unprivileged
//! test user as uid 0 of a new user namespace, as kiln runs), naming its
//! inner ignored test and a scratch directory as filters.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kiln_snapshotter::backend::{fuse, overlay, probe, BackendKind, MountedView, ViewSpec};

fn run_inner(case: &str) {
    let dir = kiln_vm_tests::test_dir(case);
    kiln_vm_tests::run_inner_test(&format!("inner_{case}"), &dir);
}

/// A fresh spec under `dir/name` with the given lower layers.
fn spec(dir: &Path, name: &str, lowers: Vec<PathBuf>) -> ViewSpec {
    let root = dir.join(name);
    let spec = ViewSpec {
        lowers,
        upper: root.join("upper"),
        work: root.join("work"),
        target: root.join("view"),
    };
    for d in [&spec.upper, &spec.work, &spec.target] {
        fs::create_dir_all(d).unwrap();
    }
    spec
}

macro_rules! userns_case {
    ($outer:ident, $inner:ident, $body:expr) => {
        #[test]
        fn $outer() {
            run_inner(stringify!($outer));
        }

        #[test]
        #[ignore = "run by its outer test inside a user namespace"]
        fn $inner() {
            let Some(dir) = kiln_vm_tests::inner_test_dir() else {
                return;
            };
            fuse::set_server_program(env!("CARGO_BIN_EXE_kiln-fuse-server"));
            let body: fn(&Path) = $body;
            body(&dir);
        }
    };
}

userns_case!(
    fuse_lower_hard_links_stay_linked,
    inner_fuse_lower_hard_links_stay_linked,
    |dir| {
        let lower = dir.join("lower");
        fs::create_dir_all(lower.join("d")).unwrap();
        fs::write(lower.join("d/a"), "shared\n").unwrap();
        fs::hard_link(lower.join("d/a"), lower.join("b")).unwrap();
        fs::write(lower.join("c1"), "kept in the lower layer\n").unwrap();
        fs::hard_link(lower.join("c1"), lower.join("c2")).unwrap();
        let spec = spec(dir, "fuse", vec![lower]);
        let view = fuse::mount(&spec).unwrap();
        let v = view.path();
        let ino_before = fs::metadata(v.join("b")).unwrap().ino();
        assert_eq!(fs::metadata(v.join("d/a")).unwrap().ino(), ino_before);
        fs::OpenOptions::new()
            .append(true)
            .open(v.join("d/a"))
            .unwrap()
            .write_all(b"written through a\n")
            .unwrap();
        assert_eq!(
            fs::read_to_string(v.join("b")).unwrap(),
            "shared\nwritten through a\n"
        );
        assert_eq!(
            fs::metadata(v.join("b")).unwrap().ino(),
            ino_before,
            "inode number changed on copy-up"
        );
        // removing one name of a lower file leaves the other in the lower
        // layer (the ctime the kernel then flushes copies nothing up), as
        // overlayfs does
        let c1 = fs::metadata(v.join("c1")).unwrap();
        fs::remove_file(v.join("c2")).unwrap();
        assert_eq!(
            fs::read_to_string(v.join("c1")).unwrap(),
            "kept in the lower layer\n"
        );
        let c1_after = fs::metadata(v.join("c1")).unwrap();
        assert_eq!(c1_after.modified().unwrap(), c1.modified().unwrap());
        drop(view);
        assert!(!spec.upper.join("c1").exists(), "removing c2 copied c1 up");
        let c2 = fs::symlink_metadata(spec.upper.join("c2")).unwrap();
        assert!(
            std::os::unix::fs::FileTypeExt::is_char_device(&c2.file_type()),
            "c2 has no whiteout"
        );
        let (a, b) = (
            fs::metadata(spec.upper.join("d/a")).unwrap(),
            fs::metadata(spec.upper.join("b")).unwrap(),
        );
        assert_eq!(a.ino(), b.ino(), "copied-up names are not linked in upper");
        assert_eq!(
            fs::read_to_string(spec.upper.join("b")).unwrap(),
            "shared\nwritten through a\n"
        );
    }
);

userns_case!(
    fuse_inode_numbers_are_stable,
    inner_fuse_inode_numbers_are_stable,
    |dir| {
        let lower = dir.join("lower");
        fs::create_dir_all(lower.join("d/e")).unwrap();
        fs::write(lower.join("d/f"), "f").unwrap();
        let spec = spec(dir, "fuse", vec![lower]);
        let view = fuse::mount(&spec).unwrap();
        let v = view.path();
        let before: Vec<u64> = ["d", "d/e", "d/f"]
            .iter()
            .map(|p| fs::metadata(v.join(p)).unwrap().ino())
            .collect();
        let mut seen = std::collections::HashSet::new();
        assert!(
            before.iter().all(|i| seen.insert(*i)),
            "inode numbers collide: {before:?}"
        );
        // readdir's d_ino must agree with stat
        for e in fs::read_dir(v.join("d")).unwrap() {
            let e = e.unwrap();
            use std::os::unix::fs::DirEntryExt;
            assert_eq!(
                e.ino(),
                fs::symlink_metadata(e.path()).unwrap().ino(),
                "d_ino of {:?}",
                e.file_name()
            );
        }
        // copy-up of the file and its parent must not renumber them
        fs::write(v.join("d/f"), "changed").unwrap();
        fs::create_dir(v.join("d/e/new")).unwrap();
        let after: Vec<u64> = ["d", "d/e", "d/f"]
            .iter()
            .map(|p| fs::metadata(v.join(p)).unwrap().ino())
            .collect();
        assert_eq!(before, after);
        // a renamed directory keeps its number
        fs::rename(v.join("d"), v.join("d2")).unwrap();
        assert_eq!(fs::metadata(v.join("d2")).unwrap().ino(), before[0]);
        assert_eq!(fs::read_to_string(v.join("d2/f")).unwrap(), "changed");
        drop(view);
    }
);

userns_case!(
    fuse_unmount_flushes_every_write,
    inner_fuse_unmount_flushes_every_write,
    |dir| {
        let spec = spec(dir, "fuse", Vec::new());
        let view = fuse::mount(&spec).unwrap();
        let data: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
        {
            let mut f = fs::File::create(view.path().join("big")).unwrap();
            f.write_all(&data).unwrap();
            // no fsync: the view's drop must write back what the cache holds
        }
        let mut g = fs::File::create(view.path().join("still-open")).unwrap();
        g.write_all(b"open at unmount").unwrap();
        drop(g);
        drop(view);
        assert_eq!(fs::read(spec.upper.join("big")).unwrap(), data);
        assert_eq!(
            fs::read(spec.upper.join("still-open")).unwrap(),
            b"open at unmount"
        );
    }
);

userns_case!(
    fuse_large_and_concurrent_io,
    inner_fuse_large_and_concurrent_io,
    |dir| {
        let lower = dir.join("lower");
        fs::create_dir_all(&lower).unwrap();
        let chunk: Vec<u8> = (0..1 << 20)
            .map(|i: u32| (i.wrapping_mul(7) % 253) as u8)
            .collect();
        {
            let mut f = fs::File::create(lower.join("lowbig")).unwrap();
            for _ in 0..32 {
                f.write_all(&chunk).unwrap();
            }
        }
        // every byte tells its offset, and the tail is not page aligned: a
        // read served from the wrong place or cut short cannot match
        let odd: Vec<u8> = (0..(3u32 << 20) + 12_345)
            .map(|i| (i.wrapping_mul(7) % 251) as u8)
            .collect();
        fs::write(lower.join("lowodd"), &odd).unwrap();
        let spec = spec(dir, "fuse", vec![lower]);
        let view = fuse::mount(&spec).unwrap();
        let v = view.path().to_path_buf();
        // a lower file read through the cold view: large reads are spliced,
        // small ones and the short tail are copied
        assert!(fs::read(v.join("lowodd")).unwrap() == odd, "lowodd differs");
        // 64 MiB sequential write then read through a fresh open
        {
            let mut f = fs::File::create(v.join("seq")).unwrap();
            for _ in 0..64 {
                f.write_all(&chunk).unwrap();
            }
        }
        let mut buf = vec![0u8; 1 << 20];
        let mut f = fs::File::open(v.join("seq")).unwrap();
        for i in 0..64 {
            f.read_exact(&mut buf).unwrap();
            assert!(buf == chunk, "chunk {i} differs");
        }
        assert_eq!(f.read(&mut buf).unwrap(), 0);
        // copy-up of a 32 MiB lower file keeps every byte
        fs::OpenOptions::new()
            .append(true)
            .open(v.join("lowbig"))
            .unwrap()
            .write_all(b"!")
            .unwrap();
        assert_eq!(
            fs::metadata(v.join("lowbig")).unwrap().len(),
            (32 << 20) + 1
        );
        // four writers creating and renaming at once
        std::thread::scope(|s| {
            for t in 0..4 {
                let v = v.clone();
                s.spawn(move || {
                    fs::create_dir(v.join(format!("t{t}"))).unwrap();
                    for i in 0..200 {
                        let p = v.join(format!("t{t}/f{i}"));
                        fs::write(&p, format!("{t}-{i}")).unwrap();
                        fs::rename(&p, v.join(format!("t{t}/g{i}"))).unwrap();
                    }
                });
            }
        });
        for t in 0..4 {
            assert_eq!(fs::read_dir(v.join(format!("t{t}"))).unwrap().count(), 200);
            assert_eq!(
                fs::read_to_string(v.join(format!("t{t}/g77"))).unwrap(),
                format!("{t}-77")
            );
        }
        drop(f);
        drop(view);
        let mut up = fs::File::open(spec.upper.join("lowbig")).unwrap();
        for i in 0..32 {
            up.read_exact(&mut buf).unwrap();
            assert!(buf == chunk, "copied-up chunk {i} differs");
        }
        assert_eq!(up.read(&mut buf).unwrap(), 1);
    }
);

userns_case!(
    overlay_many_long_lowers,
    inner_overlay_many_long_lowers,
    |dir| {
        // 120 layers with long names: far beyond one page of mount options
        let long = "l".repeat(60);
        let mut lowers = Vec::new();
        for i in 0..120 {
            let l = dir.join(format!("{long}-{i:03}"));
            fs::create_dir_all(&l).unwrap();
            fs::write(l.join(format!("only-{i}")), i.to_string()).unwrap();
            fs::write(l.join("shadowed"), i.to_string()).unwrap();
            lowers.push(l);
        }
        let opts: usize = lowers.iter().map(|l| l.as_os_str().len() + 1).sum();
        assert!(opts > 4096, "the test must exceed one page of options");
        let spec = spec(dir, "overlay", lowers);
        let view = overlay::mount(&spec).unwrap();
        assert_eq!(
            fs::read_to_string(view.path().join("shadowed")).unwrap(),
            "0",
            "topmost layer must win"
        );
        assert_eq!(
            fs::read_to_string(view.path().join("only-119")).unwrap(),
            "119"
        );
        drop(view);
    }
);

userns_case!(
    views_of_no_lower_layer,
    inner_views_of_no_lower_layer,
    |dir| {
        for backend in ["fuse", "overlay"] {
            let spec = spec(dir, backend, Vec::new());
            let view: Box<dyn MountedView> = if backend == "fuse" {
                fuse::mount(&spec).unwrap()
            } else {
                overlay::mount(&spec).unwrap()
            };
            fs::create_dir(view.path().join("etc")).unwrap();
            fs::write(view.path().join("etc/hostname"), "kiln").unwrap();
            drop(view);
            assert_eq!(
                fs::read_to_string(spec.upper.join("etc/hostname")).unwrap(),
                "kiln",
                "{backend}"
            );
        }
    }
);

userns_case!(
    auto_probe_picks_and_caches,
    inner_auto_probe_picks_and_caches,
    |dir| {
        let state = dir.join("state");
        let kind = probe::probe(&state);
        // this kernel (6.x) mounts overlayfs in a user namespace
        assert_eq!(kind, BackendKind::Overlay);
        let cache = fs::read_to_string(state.join(probe::CACHE_FILE)).unwrap();
        assert!(cache.contains("backend overlay"), "{cache}");
        // fuse must work here as well: it is the fallback
        let tried = probe::probe_uncached(&state);
        assert!(tried[0].1.is_ok(), "{:?}", tried[0].1);
        // the cached answer is used as long as the kernel is the same
        fs::write(
            state.join(probe::CACHE_FILE),
            cache.replace("overlay", "fuse"),
        )
        .unwrap();
        assert_eq!(probe::probe(&state), BackendKind::Fuse);
        // and ignored once the kernel changed
        let other = cache
            .lines()
            .map(|l| {
                if l.starts_with("kernel ") {
                    "kernel 0.0-old".to_string()
                } else {
                    l.replace("overlay", "fuse")
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        fs::write(state.join(probe::CACHE_FILE), other).unwrap();
        assert_eq!(probe::probe(&state), BackendKind::Overlay);
        // no scratch tree or mount left behind
        let left: Vec<_> = fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from(probe::CACHE_FILE)]);
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains(state.to_str().unwrap()),
            "probe left a mount"
        );
    }
);

userns_case!(
    fuse_delete_leaves_whiteout,
    inner_fuse_delete_leaves_whiteout,
    |dir| {
        // the fuse view must mount and serve even where kernel overlay is not
        // wanted: mount it directly and check a whiteout lands in upper
        let lower = dir.join("lower");
        fs::create_dir_all(&lower).unwrap();
        fs::write(lower.join("gone"), "x").unwrap();
        let spec = spec(dir, "fuse", vec![lower]);
        let view = fuse::mount(&spec).unwrap();
        fs::remove_file(view.path().join("gone")).unwrap();
        assert!(!view.path().join("gone").exists());
        drop(view);
        let m = fs::symlink_metadata(spec.upper.join("gone")).unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(m.file_type().is_char_device() && m.rdev() == 0);
    }
);

userns_case!(
    fuse_open_files_outlive_their_names,
    inner_fuse_open_files_outlive_their_names,
    |dir| {
        let lower = dir.join("lower");
        fs::create_dir_all(&lower).unwrap();
        fs::write(lower.join("ro"), "lower content").unwrap();
        let spec = spec(dir, "fuse", vec![lower]);
        let view = fuse::mount(&spec).unwrap();
        let v = view.path();
        // a file unlinked while open stays readable, writable and stat-able
        let mut f = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(v.join("tmp"))
            .unwrap();
        fs::remove_file(v.join("tmp")).unwrap();
        f.write_all(b"still here").unwrap();
        assert_eq!(f.metadata().unwrap().len(), 10);
        let mut s = String::new();
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(0)).unwrap();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "still here");
        assert!(!v.join("tmp").exists());
        // a read-only handle opened before a copy-up reports the new attributes
        let ro = fs::File::open(v.join("ro")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(v.join("ro"), fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(ro.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        drop((f, ro));
        drop(view);
        assert!(!spec.upper.join("tmp").exists());
    }
);

/// Descriptors open in the process serving `view`.
fn open_fds(view: &dyn MountedView) -> usize {
    fs::read_dir(format!("/proc/{}/fd", view.server_pid().unwrap()))
        .unwrap()
        .count()
}

// The fuse view answers OPEN with ENOSYS, so the kernel sends no OPEN or
// RELEASE and reads and writes arrive without a handle: copy-up waits for
// the first write, O_TRUNC arrives as a truncation, and the server keeps
// the data of files whose last name goes away until the kernel forgets
// them. Every read below is the first of its file, so it reaches the server.
userns_case!(
    fuse_files_are_served_without_open,
    inner_fuse_files_are_served_without_open,
    |dir| {
        use std::io::Seek;
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
        let lower = dir.join("lower");
        fs::create_dir_all(&lower).unwrap();
        for (name, body) in [
            ("a", "lower a"),
            ("b", "lower b content"),
            ("c", "old c"),
            ("d", "new d"),
            ("e", "lower e, about to be truncated"),
            ("f", "opened for writing, never written"),
            ("g", "lower g"),
            ("h", "lower h"),
            ("j", "lower j"),
            ("t", "lower t"),
        ] {
            fs::write(lower.join(name), body).unwrap();
        }
        let k_body: String = (0..3 * 4096u32)
            .map(|i| char::from(b'a' + u8::try_from(i % 26).unwrap()))
            .collect();
        fs::write(lower.join("k"), &k_body).unwrap();
        fs::set_permissions(lower.join("e"), fs::Permissions::from_mode(0o751)).unwrap();
        for i in 0..40 {
            fs::write(lower.join(format!("many{i}")), format!("file {i}")).unwrap();
        }
        let spec = spec(dir, "fuse", vec![lower]);
        let view = fuse::mount(&spec).unwrap();
        let v = view.path();
        let read_all = |f: &mut fs::File| {
            let mut s = String::new();
            f.seek(std::io::SeekFrom::Start(0)).unwrap();
            f.read_to_string(&mut s).unwrap();
            s
        };
        let open_rw = |name: &str| {
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(v.join(name))
                .unwrap()
        };
        // the kernel forgets the file's clean pages: the next read reaches
        // the server
        let drop_pages = |f: &fs::File| {
            let fd = std::os::fd::AsRawFd::as_raw_fd(f);
            // SAFETY: plain fadvise on an open file.
            let rc = unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) };
            assert_eq!(rc, 0);
        };

        // a lower file unlinked while open for reading is still read
        let mut a = fs::File::open(v.join("a")).unwrap();
        fs::remove_file(v.join("a")).unwrap();
        assert_eq!(read_all(&mut a), "lower a");
        assert_eq!(a.metadata().unwrap().len(), 7);

        // Removing the name of a lower file the kernel holds copies nothing
        // (the ctime the kernel then flushes is answered, not written to a
        // copy of the file): no descriptor of the server process points
        // into the work dir. Times set on the open file afterwards read
        // back, still without a copy.
        let server_fds = format!("/proc/{}/fd", view.server_pid().unwrap());
        let in_work = || {
            fs::read_dir(&server_fds)
                .unwrap()
                .filter_map(|e| fs::read_link(e.unwrap().path()).ok())
                .filter(|l| l.starts_with(&spec.work) && *l != spec.work)
                .count()
        };
        let mut t = fs::File::open(v.join("t")).unwrap();
        let (t_mtime, t_ctime) = {
            let m = t.metadata().unwrap();
            (m.modified().unwrap(), (m.ctime(), m.ctime_nsec()))
        };
        std::thread::sleep(std::time::Duration::from_millis(10));
        fs::remove_file(v.join("t")).unwrap();
        assert_eq!(in_work(), 0, "removing t copied it");
        let m = t.metadata().unwrap();
        assert_eq!(m.modified().unwrap(), t_mtime);
        assert!(
            (m.ctime(), m.ctime_nsec()) > t_ctime,
            "removing t kept its ctime"
        );
        let when = std::time::UNIX_EPOCH + std::time::Duration::new(1_000_000_000, 5);
        t.set_modified(when).unwrap();
        assert_eq!(t.metadata().unwrap().modified().unwrap(), when);
        assert_eq!(read_all(&mut t), "lower t");
        assert_eq!(in_work(), 0, "setting the times of t copied it");
        drop(t);

        // ... and one open for writing is written, truncated and chmodded
        // through a private copy; the lower file stays as it was
        let mut b = open_rw("b");
        fs::remove_file(v.join("b")).unwrap();
        b.write_all(b"NEW").unwrap();
        b.sync_all().unwrap();
        assert_eq!(read_all(&mut b), "NEWer b content");
        b.set_len(5).unwrap();
        b.set_permissions(fs::Permissions::from_mode(0o640))
            .unwrap();
        let m = b.metadata().unwrap();
        assert_eq!((m.len(), m.mode() & 0o777), (5, 0o640));
        assert_eq!(read_all(&mut b), "NEWer");

        // a file renamed over while open keeps its old content
        let mut c = fs::File::open(v.join("c")).unwrap();
        fs::rename(v.join("d"), v.join("c")).unwrap();
        assert_eq!(read_all(&mut c), "old c");
        assert_eq!(fs::read_to_string(v.join("c")).unwrap(), "new d");

        // O_TRUNC copies up without data and keeps the mode
        let mut e = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(v.join("e"))
            .unwrap();
        e.write_all(b"short").unwrap();
        drop(e);
        let m = fs::metadata(v.join("e")).unwrap();
        assert_eq!((m.len(), m.mode() & 0o7777), (5, 0o751));

        // an open for writing that writes nothing copies nothing up
        drop(
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(v.join("f"))
                .unwrap(),
        );

        // the first write copies up with the data around it
        let mut g = fs::OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(v.join("g"))
            .unwrap();
        g.write_all(b" and more").unwrap();
        drop(g);
        assert_eq!(fs::read_to_string(v.join("g")).unwrap(), "lower g and more");

        // after a copy-up, reads come from the copy, also once the kernel
        // dropped its pages (the server held the lower file open for reads)
        let mut h = open_rw("h");
        assert_eq!(read_all(&mut h), "lower h");
        h.seek(std::io::SeekFrom::Start(0)).unwrap();
        h.write_all(b"H").unwrap();
        h.sync_all().unwrap();
        drop_pages(&h);
        assert_eq!(read_all(&mut h), "Hower h");
        drop(h);

        // ... also when truncations made and changed the copy and no write
        // opened it since (a read of the lower file would bring "er j" back)
        let mut j = fs::File::open(v.join("j")).unwrap();
        assert_eq!(read_all(&mut j), "lower j");
        let jw = fs::OpenOptions::new()
            .write(true)
            .open(v.join("j"))
            .unwrap();
        jw.set_len(3).unwrap();
        jw.set_len(20).unwrap();
        drop(jw);
        drop_pages(&j);
        assert_eq!(read_all(&mut j), format!("low{}", "\0".repeat(17)));
        assert_eq!(j.metadata().unwrap().len(), 20);
        drop(j);

        // an unlinked lower file written after a SEEK_DATA (which the server
        // answers on the kept descriptor) keeps all its data
        let mut k = open_rw("k");
        fs::remove_file(v.join("k")).unwrap();
        let kfd = std::os::fd::AsRawFd::as_raw_fd(&k);
        // SAFETY: plain lseek on an open file.
        let at = unsafe { libc::lseek(kfd, 5000, libc::SEEK_DATA) };
        assert_eq!(at, 5000);
        k.seek(std::io::SeekFrom::Start(0)).unwrap();
        k.write_all(b"X").unwrap();
        k.sync_all().unwrap();
        drop_pages(&k);
        let want = format!("X{}", &k_body[1..]);
        assert!(read_all(&mut k) == want, "the copy of k lost data");
        drop(k);

        // kept data goes once the kernel forgets the files
        drop((a, b, c));
        let before = open_fds(&*view);
        for i in 0..40 {
            let name = v.join(format!("many{i}"));
            let mut f = fs::File::open(&name).unwrap();
            fs::remove_file(&name).unwrap();
            assert_eq!(read_all(&mut f), format!("file {i}"));
        }
        let mut now = open_fds(&*view);
        for _ in 0..100 {
            if now <= before {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            now = open_fds(&*view);
        }
        assert!(
            now <= before,
            "{} descriptors still open after the files were closed",
            now - before
        );

        drop(view);
        let up = &spec.upper;
        assert_eq!(fs::read_to_string(up.join("e")).unwrap(), "short");
        assert_eq!(fs::metadata(up.join("e")).unwrap().mode() & 0o7777, 0o751);
        assert!(!up.join("f").exists(), "an unwritten open copied f up");
        assert_eq!(
            fs::read_to_string(up.join("g")).unwrap(),
            "lower g and more"
        );
        assert_eq!(fs::read_to_string(up.join("c")).unwrap(), "new d");
        for name in ["a", "b"] {
            let m = fs::symlink_metadata(up.join(name)).unwrap();
            assert!(
                m.file_type().is_char_device() && m.rdev() == 0,
                "{name} whiteout"
            );
        }
        assert_eq!(fs::read_dir(&spec.work).unwrap().count(), 0);
    }
);

userns_case!(
    fuse_reads_match_the_lower_file,
    inner_fuse_reads_match_the_lower_file,
    |dir| {
        use std::os::unix::fs::FileExt;
        let lower = dir.join("lower");
        fs::create_dir_all(&lower).unwrap();
        let data: Vec<u8> = (0..(3 << 20) + 123u32)
            .map(|i| (i.wrapping_mul(31) % 251) as u8)
            .collect();
        fs::write(lower.join("f"), &data).unwrap();
        fs::write(lower.join("empty"), b"").unwrap();
        let spec = spec(dir, "fuse", vec![lower]);
        let view = fuse::mount(&spec).unwrap();
        let v = view.path();
        // positional reads at awkward offsets, on a cold cache
        let f = fs::File::open(v.join("f")).unwrap();
        for (off, len) in [
            (0usize, 1usize),
            (4095, 4098),
            ((128 << 10) - 1, 300_000),
            ((1 << 20) + 7, 1 << 20),
            (data.len() - 10, 64),
        ] {
            let mut buf = vec![0u8; len];
            let n = f.read_at(&mut buf, off as u64).unwrap();
            let want = &data[off..(off + len).min(data.len())];
            assert_eq!(&buf[..n], &want[..n], "read at {off}");
            assert!(n > 0);
        }
        let mut buf = [0u8; 16];
        assert_eq!(
            f.read_at(&mut buf, data.len() as u64).unwrap(),
            0,
            "read at end of file"
        );
        assert_eq!(fs::read(v.join("f")).unwrap(), data);
        assert_eq!(fs::read(v.join("empty")).unwrap(), b"");
        drop(f);
        drop(view);
    }
);

userns_case!(
    fuse_server_threads_read_only_what_their_rules_allow,
    inner_fuse_server_threads_read_only_what_their_rules_allow,
    |dir| {
        use kiln_snapshotter::confine::{status, Rules, Status};
        if !matches!(status(), Status::Enforced { .. } | Status::Partial { .. }) {
            kiln_vm_tests::missing_prerequisite(&format!("Landlock: {}", status()));
            return;
        }
        let (l1, l2) = (dir.join("l1"), dir.join("l2"));
        fs::create_dir_all(&l1).unwrap();
        fs::create_dir_all(&l2).unwrap();
        fs::write(l1.join("allowed"), "one").unwrap();
        fs::write(l2.join("outside"), "two").unwrap();
        let spec = spec(dir, "v", vec![l1.clone(), l2.clone()]);
        // the server may read l1 but not l2, as if l2 were a host
        // directory a mistake had steered it to
        let rules = Rules::new().read(&l1).write(&spec.upper).write(&spec.work);
        let view = fuse::mount_confined(&spec, &rules).unwrap();
        assert_eq!(
            fs::read_to_string(spec.target.join("allowed")).unwrap(),
            "one"
        );
        let err = fs::read_to_string(spec.target.join("outside")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
        drop(view);
        // with the view's own rules the same file reads
        let view = fuse::mount(&spec).unwrap();
        assert_eq!(
            fs::read_to_string(spec.target.join("outside")).unwrap(),
            "two"
        );
        drop(view);
    }
);

userns_case!(
    fuse_truncate_to_the_same_size_changes_nothing,
    inner_fuse_truncate_to_the_same_size_changes_nothing,
    |dir| {
        // the kernel's writeback cache keeps the file's times on such a
        // truncate; the server must not move them underneath, or the
        // layer would hold a file the step never saw change
        let lower = dir.join("lower");
        fs::create_dir_all(&lower).unwrap();
        fs::write(lower.join("b"), "twenty bytes of data").unwrap();
        let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_600_000_000);
        fs::File::options()
            .write(true)
            .open(lower.join("b"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        let spec = spec(dir, "v", vec![lower]);
        let view = fuse::mount(&spec).unwrap();
        let b = spec.target.join("b");
        let c = std::ffi::CString::new(b.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated path.
        assert_eq!(unsafe { libc::truncate(c.as_ptr(), 20) }, 0);
        assert_eq!(fs::metadata(&b).unwrap().mtime(), 1_600_000_000);
        drop(view);
        assert!(
            !spec.upper.join("b").exists(),
            "copied up with new times the step did not see"
        );
    }
);

// The server is a process of its own: not this one (whose memory holds
// whatever the caller keeps there), without its environment or network,
// with only the file capabilities, no_new_privs and a seccomp filter.
userns_case!(
    fuse_server_is_a_confined_process_of_its_own,
    inner_fuse_server_is_a_confined_process_of_its_own,
    |dir| {
        let lower = dir.join("lower");
        fs::create_dir_all(&lower).unwrap();
        fs::write(lower.join("f"), "served").unwrap();
        // something worth stealing in the caller's memory and environment
        let secret = format!("kiln-view-secret-{}-{:?}", std::process::id(), dir);
        std::env::set_var("KILN_VIEW_SECRET", &secret);
        let kept_secret = std::hint::black_box(secret.clone().into_bytes());
        let spec = spec(dir, "v", vec![lower]);
        let view = fuse::mount(&spec).unwrap();
        assert_eq!(fs::read_to_string(spec.target.join("f")).unwrap(), "served");
        let pid = view.server_pid().expect("a server process");
        assert_ne!(
            pid,
            std::process::id(),
            "the view is served by this process"
        );
        let field = |name: &str| kiln_vm_tests::status_field(pid, name);
        assert_eq!(field("Seccomp"), "2");
        assert_eq!(field("NoNewPrivs"), "1");
        // CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID MKNOD SETFCAP
        for set in ["CapEff", "CapPrm", "CapBnd"] {
            assert_eq!(field(set), "000000008800001f", "{set}");
        }
        assert_eq!(field("CapInh"), "0000000000000000");
        let ns = |p: &str| fs::read_link(format!("/proc/{p}/ns/net")).unwrap();
        assert_ne!(
            ns(&pid.to_string()),
            ns("self"),
            "the server shares our network"
        );
        assert_eq!(
            fs::read(format!("/proc/{pid}/environ")).unwrap(),
            b"",
            "the server kept an environment"
        );
        // nothing of this process's memory: the secret is not in the
        // server's (and the scan finds it in ours)
        let copies = |pid: u32| kiln_vm_tests::copies_in_memory(pid, &kept_secret);
        assert!(
            copies(std::process::id()) > 0,
            "the scan cannot find the secret at all"
        );
        assert_eq!(copies(pid), 0, "the server holds the secret");
        drop(view);
        // it ended with the view
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }
);
