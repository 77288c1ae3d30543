//! Contexts that are not a directory, as `docker buildx build` takes them:
//! `kiln build -` and `-f -` (the context on standard input: a tar, plain
//! or compressed, or a Dockerfile alone, with an empty context; or the
//! Dockerfile on standard input with a context directory), a git URL
//! (fetched as `ADD` fetches one, [`crate::engine::git`]) and an HTTP(S)
//! URL of a tar or a Dockerfile (downloaded as `ADD <url>` is). Both are
//! fetched under the build's network policy. What comes in is written
//! under the state directory for the build's lifetime; a tar is unpacked
//! by the same guarded code as an image layer (paths kept inside, the
//! layer size and entry limits applied).

use std::io::{BufRead, BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// The directory holding what standard input gave; removed on drop.
pub struct StdinInput {
    dir: PathBuf,
}

impl StdinInput {
    /// `STATE/stdin/PID-N` (the Nth of this process), made empty; what
    /// killed builds left is swept.
    fn new(state_root: &Path) -> anyhow::Result<StdinInput> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let parent = state_root.join("stdin");
        std::fs::create_dir_all(&parent).with_context(|| parent.display().to_string())?;
        sweep(&parent);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = parent.join(format!("{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).with_context(|| dir.display().to_string())?;
        Ok(StdinInput { dir })
    }
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
    let input = StdinInput::new(state_root)?;
    let mut stdin = BufReader::with_capacity(1 << 20, std::io::stdin().lock());
    if file_stdin {
        *file = Some(write_dockerfile(
            &mut stdin,
            &input.dir,
            Path::new("Dockerfile"),
        )?);
        return Ok(Some(input));
    }
    unpack_or_dockerfile(&mut stdin, &input, context, file, "standard input")?;
    Ok(Some(input))
}

/// `input` (a tar or a Dockerfile) as the context: a tar is unpacked into
/// `dir/context`; anything else is the Dockerfile, with an empty context.
fn unpack_or_dockerfile(
    input: &mut impl BufRead,
    dir: &StdinInput,
    context: &mut PathBuf,
    file: &mut Option<PathBuf>,
    from: &str,
) -> anyhow::Result<()> {
    let ctx = dir.dir.join("context");
    std::fs::create_dir(&ctx)?;
    if is_archive(
        input
            .fill_buf()
            .with_context(|| format!("cannot read {from}"))?,
    ) {
        kiln_snapshotter::apply::apply(input, &ctx, &[])
            .with_context(|| format!("cannot unpack the build context tar from {from}"))?;
        in_context(file, &ctx);
    } else {
        // the Dockerfile alone; -f names it, as BuildKit does for a
        // context that is one file
        let name = match file.as_deref().and_then(Path::file_name) {
            Some(n) => PathBuf::from(n),
            None => PathBuf::from("Dockerfile"),
        };
        *file = Some(write_dockerfile(input, &dir.dir, &name)?);
    }
    *context = ctx;
    Ok(())
}

/// `-f` names a file of a context that is not a directory (a tar, a git
/// repository), as docker takes it.
fn in_context(file: &mut Option<PathBuf>, ctx: &Path) {
    if let Some(f) = file.as_mut() {
        if f.is_relative() {
            *f = ctx.join(&*f);
        }
    }
}

/// Whether the context names a git repository or an HTTP(S) URL.
pub fn is_remote(context: &Path) -> bool {
    let s = context.to_string_lossy();
    crate::frontend::instructions::is_remote(&s)
}

/// Where a remote context is fetched from, and how.
pub struct Remote<'a> {
    pub network: kiln_runtime::Network,
    /// `BUILDKIT_CONTEXT_KEEP_GIT_DIR`
    pub keep_git_dir: bool,
    pub state_root: &'a Path,
    /// the `--ssh default` agent, for a git context over SSH
    pub ssh: Option<std::sync::Arc<crate::session::ssh::Agent>>,
}

impl Remote<'_> {
    /// Fetch the remote `context` and replace it (and a relative `-f`) by
    /// local paths. Also returns the context's time, as BuildKit takes it
    /// for `SOURCE_DATE_EPOCH=context`.
    pub fn take(
        &self,
        context: &mut PathBuf,
        file: &mut Option<PathBuf>,
    ) -> anyhow::Result<(StdinInput, Option<i64>)> {
        let url = context.to_string_lossy().into_owned();
        let input = StdinInput::new(self.state_root)?;
        let what = format!("the build context {url}");
        let epoch = match self.fetch(&url, &input.dir.join("context"), &what)? {
            Fetched::Tree { tree, epoch } => {
                in_context(file, &tree);
                *context = tree;
                epoch
            }
            // one file that is not an archive: the Dockerfile, with an
            // empty context (-f names it, as BuildKit does)
            Fetched::File { path, epoch } => {
                let ctx = input.dir.join("empty-context");
                std::fs::create_dir(&ctx)?;
                let name = match file.as_deref().and_then(Path::file_name) {
                    Some(n) => PathBuf::from(n),
                    None => PathBuf::from("Dockerfile"),
                };
                let mut f = std::fs::File::open(&path)?;
                *file = Some(write_dockerfile(&mut f, &input.dir, &name)?);
                *context = ctx;
                epoch
            }
        };
        Ok((input, epoch))
    }

    /// Fetch `--build-context NAME=URL` (a git repository, or a tar or a
    /// single file over HTTP(S)) into a directory; also its time.
    pub fn named(
        &self,
        name: &str,
        url: &str,
    ) -> anyhow::Result<(StdinInput, PathBuf, Option<i64>)> {
        let input = StdinInput::new(self.state_root)?;
        let what = format!("--build-context {name}={url}");
        Ok(match self.fetch(url, &input.dir.join("context"), &what)? {
            Fetched::Tree { tree, epoch } => (input, tree, epoch),
            Fetched::File { path, epoch } => {
                let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
                (input, dir, epoch)
            }
        })
    }

    /// The time of the source `url` (an `ADD` of a source-only stage), as
    /// BuildKit takes it for SOURCE_DATE_EPOCH: a commit's committer
    /// time, a Last-Modified header, or the newest file of an archive.
    pub fn time_of(&self, url: &str, what: &str) -> anyhow::Result<Option<i64>> {
        let input = StdinInput::new(self.state_root)?;
        Ok(match self.fetch(url, &input.dir.join("source"), what)? {
            Fetched::Tree { epoch, .. } | Fetched::File { epoch, .. } => epoch,
        })
    }

    /// Fetch `url` into `dir` (which must not exist) under the build's
    /// network policy: a git checkout, an unpacked archive, or one file.
    fn fetch(&self, url: &str, dir: &Path, what: &str) -> anyhow::Result<Fetched> {
        if crate::frontend::instructions::is_git(url) {
            let mut g = crate::engine::git::GitRef::parse(url)?;
            g.keep_git_dir |= self.keep_git_dir;
            std::fs::create_dir(dir)?;
            let checkout =
                crate::engine::git::fetch(&g, None, self.network, self.ssh.as_ref(), dir)
                    .with_context(|| format!("cannot fetch {what}"))?;
            return Ok(Fetched::Tree {
                tree: checkout.tree,
                epoch: Some(checkout.committed),
            });
        }
        let fetcher = crate::engine::download::Fetcher {
            network: self.network,
            ca_files: crate::registry::config::Config::load(&[])?.ca_files,
            limit: crate::engine::download::DEFAULT_MAX_SIZE,
            dir: crate::engine::download::download_dir(self.state_root)?,
        };
        let d = fetcher
            .fetch(url)
            .with_context(|| format!("cannot fetch {what}"))?;
        let last_modified = (d.mtime > 0).then_some(d.mtime);
        let mut f = d.file;
        f.seek(std::io::SeekFrom::Start(0))?;
        let mut reader = BufReader::new(f);
        std::fs::create_dir(dir)?;
        if is_archive(
            reader
                .fill_buf()
                .with_context(|| format!("cannot read {what}"))?,
        ) {
            kiln_snapshotter::apply::apply(&mut reader, dir, &[])
                .with_context(|| format!("cannot unpack {what}"))?;
            let epoch = last_modified.or_else(|| newest_file(dir));
            return Ok(Fetched::Tree {
                tree: dir.to_path_buf(),
                epoch,
            });
        }
        let name = url
            .split(['?', '#'])
            .next()
            .and_then(|u| u.rsplit('/').next())
            .filter(|n| !n.is_empty() && *n != "." && *n != "..")
            .unwrap_or("__unnamed__");
        let path = dir.join(name);
        let mut out = std::fs::File::create(&path).with_context(|| path.display().to_string())?;
        std::io::copy(&mut reader, &mut out).with_context(|| format!("cannot save {what}"))?;
        Ok(Fetched::File {
            path,
            epoch: last_modified,
        })
    }
}

/// What a remote source became.
enum Fetched {
    /// a directory: a checkout or an unpacked archive
    Tree { tree: PathBuf, epoch: Option<i64> },
    /// one downloaded file that is not an archive
    File { path: PathBuf, epoch: Option<i64> },
}

/// The newest modification time of a regular file under `dir` (the
/// archive's newest file, as BuildKit reads it from the tar), not
/// following symlinks.
fn newest_file(dir: &Path) -> Option<i64> {
    use std::os::unix::fs::MetadataExt;
    let mut newest = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                newest = newest.max(Some(m.mtime()));
            }
        }
    }
    newest
}

/// Write the Dockerfile read from `stdin` to `dir/name`.
fn write_dockerfile(stdin: &mut impl Read, dir: &Path, name: &Path) -> anyhow::Result<PathBuf> {
    let mut text = Vec::new();
    stdin
        .take(MAX_DOCKERFILE + 1)
        .read_to_end(&mut text)
        .context("cannot read the Dockerfile from standard input")?;
    if text.len() as u64 > MAX_DOCKERFILE {
        bail!("the Dockerfile on standard input is larger than {MAX_DOCKERFILE} bytes");
    }
    let path = dir.join(name);
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
        let pid = name.to_str().map(|n| n.split('-').next().unwrap_or(n));
        let Some(pid) = pid.and_then(|n| n.parse::<u32>().ok()) else {
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
