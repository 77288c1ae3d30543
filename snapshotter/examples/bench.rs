//! Throughput of the snapshotter's storage paths on this machine: commit
//! (diff + compression + both digests) per compression, apply, copy-backend
//! prepare and a one-file commit on a large parent. Run inside kiln's user
//! namespace (or as root):
//! `unshare --user --map-root-user --map-auto --mount target/release/examples/bench DIR`
//! Sizes: BENCH_SMALL small files (default 20000), BENCH_BIG_MIB MiB of
//! half-compressible large files (default 256).

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use kiln_snapshotter::backend::BackendKind;
use kiln_snapshotter::compression::Compression;
use kiln_snapshotter::diff::DiffOptions;
use kiln_snapshotter::snapshot::Snapshotter;

/// CPU seconds (user + system, all threads) this process has used: less
/// sensitive than wall time to other work on a shared machine.
fn cpu() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `ru` is writable and sized for struct rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    // SAFETY: zero-initialised and filled by getrusage.
    let ru = unsafe { ru.assume_init() };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn make_tree(dir: &Path, small: usize, big_mib: usize) -> anyhow::Result<u64> {
    let mut bytes = 0u64;
    for i in 0..small {
        let d = dir.join(format!("small/{:03}", i % 500));
        fs::create_dir_all(&d)?;
        let data = format!("file {i}\n").repeat(8);
        bytes += data.len() as u64;
        fs::write(d.join(format!("f{i}")), data)?;
    }
    fs::create_dir_all(dir.join("big"))?;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..big_mib.div_ceil(64) {
        let data: Vec<u8> = (0..64usize << 20)
            .map(|n| {
                if n % 4096 < 2048 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()[0]
                } else {
                    b'a'
                }
            })
            .collect();
        bytes += data.len() as u64;
        fs::write(dir.join(format!("big/blob{i}")), data)?;
    }
    Ok(bytes)
}

fn main() -> anyhow::Result<()> {
    kiln_snapshotter::backend::fuse::serve_if_asked();
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/tmp/kiln-bench".into());
    let root = Path::new(&dir);
    let _ = fs::remove_dir_all(root);
    fs::create_dir_all(root)?;
    let src = root.join("src");
    let bytes = make_tree(&src, env("BENCH_SMALL", 20_000), env("BENCH_BIG_MIB", 256))?;
    let mib = bytes as f64 / 1_048_576.0;
    println!("content: {mib:.1} MiB");
    let durable = std::env::var_os("BENCH_DURABLE").is_some();
    println!("durable layers: {durable}");
    let mut snap = Snapshotter::open(&root.join("store"), BackendKind::Copy)?;
    snap.set_durable_layers(durable);
    let mut base = None;
    for (name, c) in [
        ("none", Compression::None),
        ("gzip-6", Compression::Gzip { level: 6 }),
        ("zstd-3", Compression::Zstd { level: 3 }),
    ] {
        let v = snap.prepare(&format!("v-{name}"), None)?;
        let ok = Command::new("cp")
            .arg("-a")
            .arg(src.join("."))
            .arg(v.path())
            .status()?;
        anyhow::ensure!(ok.success(), "cp failed");
        let (t, c0) = (Instant::now(), cpu());
        let opts = DiffOptions {
            compression: c,
            source_date_epoch: Some(1),
        };
        let committed = snap.commit(v, opts)?;
        let (secs, cpus) = (t.elapsed().as_secs_f64(), cpu() - c0);
        println!(
            "commit {name:7} {secs:6.2} s wall {cpus:6.2} s cpu {:7.1} MiB/s  blob {:.1} MiB",
            mib / secs,
            committed.blob.size() as f64 / 1_048_576.0
        );
        let mut fresh = Snapshotter::open(&root.join(format!("fresh-{name}")), BackendKind::Copy)?;
        fresh.set_durable_layers(durable);
        let (t, c0) = (Instant::now(), cpu());
        let blob = snap.content().open_blob(committed.blob.digest())?;
        fresh.import(blob, None, Some(&committed.diff_id))?;
        let (secs, cpus) = (t.elapsed().as_secs_f64(), cpu() - c0);
        println!(
            "apply  {name:7} {secs:6.2} s wall {cpus:6.2} s cpu {:7.1} MiB/s",
            mib / secs
        );
        base.get_or_insert(committed.chain_id);
    }
    let t = Instant::now();
    let v = snap.prepare("copy-view", base.as_ref())?;
    println!("copy backend prepare {:6.2} s", t.elapsed().as_secs_f64());
    fs::write(v.path().join("one-change"), b"x")?;
    let t = Instant::now();
    let c = snap.commit(v, DiffOptions::default())?;
    println!(
        "copy backend commit of one new file {:6.2} s (blob {} bytes)",
        t.elapsed().as_secs_f64(),
        c.blob.size()
    );
    let usage = snap.layers().usage()?;
    println!(
        "layer store: {:.1} MiB in {} layers",
        usage.total as f64 / 1_048_576.0,
        usage.layers.len()
    );
    Ok(())
}
