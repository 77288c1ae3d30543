//! `kiln load`: the manifest, config and index JSON of a docker-archive or
//! oci-archive are untrusted, and kiln parses them itself
//! (`image::archive::load`, which reads OCI layouts through
//! `ImageStore::get`). Loading must fail cleanly, never panic.
//!
//! A fuzzer cannot guess SHA-256 digests, so the input describes the
//! archive and this harness fills the digests in:
//!
//! - byte 0: bit 0 clear = docker-archive, set = oci-archive;
//! - the rest, split on the line `--`: chunk 0 is `manifest.json`
//!   (docker) or `index.json` (OCI), chunks 1.. are blobs;
//! - in any chunk, `$N` (N = 1..9) becomes `sha256:<hex>` of blob N and
//!   `#N` its size in bytes; blobs are finished last to first, so a blob
//!   refers only to later ones (config and layers after the manifest);
//! - a docker-archive stores blob N as the file `bN`; an oci-archive as
//!   `blobs/sha256/<hex>`, with `oci-layout` version 1.0.0.
//!
//! Each input loads into a fresh store in a temporary directory.

#![no_main]

use kiln_builder::image::{archive, ImageStore};
use kiln_snapshotter::{BackendKind, Snapshotter};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest as _, Sha256};

const MAX_BLOBS: usize = 9;

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Replace `$N` and `#N` for every finished blob N.
fn fill(chunk: &[u8], done: &[Option<(String, usize)>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(chunk.len());
    let mut i = 0;
    while i < chunk.len() {
        let c = chunk[i];
        if (c == b'$' || c == b'#') && i + 1 < chunk.len() && (b'1'..=b'9').contains(&chunk[i + 1])
        {
            let n = usize::from(chunk[i + 1] - b'0');
            if let Some(Some((h, size))) = done.get(n) {
                if c == b'$' {
                    out.extend_from_slice(b"sha256:");
                    out.extend_from_slice(h.as_bytes());
                } else {
                    out.extend_from_slice(size.to_string().as_bytes());
                }
                i += 2;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    out
}

fn split_chunks(data: &[u8]) -> Vec<&[u8]> {
    let mut chunks = Vec::new();
    let mut rest = data;
    while chunks.len() < MAX_BLOBS {
        match rest.windows(4).position(|w| w == b"\n--\n") {
            Some(i) => {
                chunks.push(&rest[..i]);
                rest = &rest[i + 4..];
            }
            None => break,
        }
    }
    chunks.push(rest);
    chunks
}

fn add(tar: &mut tar::Builder<Vec<u8>>, path: &str, bytes: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_size(bytes.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, path, bytes)
        .expect("append to an in-memory tar");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let oci = mode & 1 == 1;
    let chunks = split_chunks(rest);
    let mut done: Vec<Option<(String, usize)>> = vec![None; chunks.len()];
    let mut blobs: Vec<Vec<u8>> = vec![Vec::new(); chunks.len()];
    for n in (1..chunks.len()).rev() {
        let b = fill(chunks[n], &done);
        done[n] = Some((hex(&b), b.len()));
        blobs[n] = b;
    }
    let top = fill(chunks[0], &done);

    let mut tar = tar::Builder::new(Vec::new());
    if oci {
        add(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
        add(&mut tar, "index.json", &top);
        for n in 1..chunks.len() {
            let (h, _) = done[n].as_ref().expect("every blob is finished");
            add(&mut tar, &format!("blobs/sha256/{h}"), &blobs[n]);
        }
    } else {
        add(&mut tar, "manifest.json", &top);
        for (n, b) in blobs.iter().enumerate().skip(1) {
            add(&mut tar, &format!("b{n}"), b);
        }
    }
    let archive = tar.into_inner().expect("finish the in-memory tar");

    let tmp = tempfile::tempdir().expect("temporary directory");
    let snap = Snapshotter::open(tmp.path(), BackendKind::Copy).expect("open a fresh snapshotter");
    let store = ImageStore::new(&snap);
    if archive::load(&store, &archive[..]).is_ok() {
        // what was loaded reads back
        for s in store.list().expect("list the loaded images") {
            store
                .resolve(&s.digest.to_string())
                .expect("a loaded image resolves by its digest");
        }
    }
});
