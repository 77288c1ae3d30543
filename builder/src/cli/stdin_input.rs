//! `kiln build -` and `-f -`, as `docker buildx build` takes them: the
//! context on standard input (a tar, plain or compressed, or a Dockerfile
//! alone, with an empty context), or the Dockerfile on standard input with
//! a context directory. What comes in is written under the state
//! directory for the build's lifetime; a tar is unpacked by the same
//! guarded code as an image layer (paths kept inside, the layer size and
//! entry limits applied).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// The directory holding what standard input gave; removed on drop.
pub struct StdinInput {
    dir: PathBuf,
}

impl Drop for StdinInput {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The most bytes of a Dockerfile read from standard input.
const MAX_DOCKERFILE: u64 = 16 << 20;

/// Replace a `-` context or `-f -` in (`context`, `file`) by paths of what
/// standard input holds, under `state_root`. None when neither is `-`.
pub fn take(
    context: &mut PathBuf,
    file: &mut Option<PathBuf>,
    state_root: &Path,
) -> anyhow::Result<Option<StdinInput>> {
    let ctx_stdin = context.as_os_str() == "-";
    let file_stdin = file.as_ref().is_some_and(|f| f.as_os_str() == "-");
    if !ctx_stdin && !file_stdin {
        return Ok(None);
    }
    if ctx_stdin && file_stdin {
        bail!("the context and the Dockerfile (-f) cannot both be read from standard input");
    }
    let parent = state_root.join("stdin");
    std::fs::create_dir_all(&parent).with_context(|| parent.display().to_string())?;
    sweep(&parent);
    let dir = parent.join(std::process::id().to_string());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).with_context(|| dir.display().to_string())?;
    let input = StdinInput { dir };
    let mut stdin = BufReader::with_capacity(1 << 20, std::io::stdin().lock());
    if file_stdin {
        *file = Some(write_dockerfile(&mut stdin, &input.dir)?);
        return Ok(Some(input));
    }
    let ctx = input.dir.join("context");
    std::fs::create_dir(&ctx)?;
    if is_archive(stdin.fill_buf().context("cannot read standard input")?) {
        kiln_snapshotter::apply::apply(stdin, &ctx, &[])
            .context("cannot unpack the build context tar from standard input")?;
        // -f names a file of the tar, as docker takes it
        if let Some(f) = file.as_mut() {
            if f.is_relative() {
                *f = ctx.join(&*f);
            }
        }
    } else {
        if file.is_some() {
            bail!("-f with a Dockerfile on standard input: the Dockerfile is standard input");
        }
        *file = Some(write_dockerfile(&mut stdin, &input.dir)?);
    }
    *context = ctx;
    Ok(Some(input))
}

/// Write the Dockerfile from standard input to `dir/Dockerfile`.
fn write_dockerfile(stdin: &mut impl Read, dir: &Path) -> anyhow::Result<PathBuf> {
    let mut text = Vec::new();
    stdin
        .take(MAX_DOCKERFILE + 1)
        .read_to_end(&mut text)
        .context("cannot read the Dockerfile from standard input")?;
    if text.len() as u64 > MAX_DOCKERFILE {
        bail!("the Dockerfile on standard input is larger than {MAX_DOCKERFILE} bytes");
    }
    let path = dir.join("Dockerfile");
    std::fs::write(&path, text).with_context(|| path.display().to_string())?;
    Ok(path)
}

/// Whether `head` starts a tar (`ustar` at 257) or a compressed stream
/// (gzip, zstd, bzip2, xz), not Dockerfile text.
fn is_archive(head: &[u8]) -> bool {
    const MAGICS: [&[u8]; 4] = [
        &[0x1f, 0x8b],
        &[0x28, 0xb5, 0x2f, 0xfd],
        b"BZh",
        &[0xfd, b'7', b'z', b'X', b'Z', 0],
    ];
    MAGICS.iter().any(|m| head.starts_with(m)) || head.get(257..262) == Some(b"ustar")
}

/// Remove what builds that ended (killed) left behind.
fn sweep(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tars_and_compressed_streams_are_archives_and_text_is_not() {
        let mut tar = vec![0u8; 512];
        tar[257..262].copy_from_slice(b"ustar");
        assert!(is_archive(&tar));
        assert!(is_archive(&[0x1f, 0x8b, 8, 0]));
        assert!(is_archive(&[0x28, 0xb5, 0x2f, 0xfd, 0]));
        assert!(!is_archive(b"FROM busybox\nRUN echo hi\n"));
        assert!(!is_archive(b""));
    }
}
