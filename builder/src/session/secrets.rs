//! Build secrets: the `--secret` flags of `kiln build`, read once at the
//! start of the build into memory that is wiped when the build ends.
//!
//! A secret's bytes go from here to exactly two places: the private tmpfs
//! of a step that mounts it (`kiln_runtime::PrivateFile`) or that step's
//! environment (`env=`), and the [`Redactor`] that masks them in the step's
//! output. They are never written to disk, never part of a cache key, and
//! no error message or `Debug` output of this module contains them.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// The largest secret kiln accepts, as BuildKit (500 KB).
pub const MAX_SECRET_SIZE: u64 = 500 * 1024;

/// Errors of `--secret`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--secret {0:?}: expected id=ID[,src=FILE|,env=VAR]")]
    Syntax(String),
    #[error("--secret {flag:?}: unknown key {key:?}; use id, src (or source), env or type")]
    UnknownKey { flag: String, key: String },
    #[error("--secret {flag:?}: type must be file or env, not {value:?}")]
    Type { flag: String, value: String },
    #[error("--secret {0:?}: src and env cannot both be given")]
    Both(String),
    #[error("--secret id={id}: the environment variable {var} is not set")]
    NoVariable { id: String, var: String },
    #[error(
        "--secret id={id}: neither the environment variable {id} nor a file named {id} exists"
    )]
    NotFound { id: String },
    #[error("--secret id={id}: cannot read {}", path.display())]
    Read {
        id: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--secret id={id}: {size} bytes is larger than the {MAX_SECRET_SIZE}-byte limit")]
    TooLarge { id: String, size: u64 },
    #[error("--secret id={0} is given twice")]
    Duplicate(String),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Where a `--secret` comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    File(PathBuf),
    Env(String),
    /// neither src nor env: the variable ID if set, else a file named ID
    Guess,
}

/// The secrets of one build, by id.
#[derive(Default)]
pub struct Secrets {
    values: BTreeMap<String, Zeroizing<Vec<u8>>>,
}

impl std::fmt::Debug for Secrets {
    // ids only, never values
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.values.keys()).finish()
    }
}

fn parse_flag(flag: &str) -> Result<(String, Origin)> {
    let mut id = None;
    let mut src = None;
    let mut env = None;
    let mut kind = None;
    let pairs = crate::options::pairs(flag, crate::options::Quotes::FieldStart)
        .map_err(|_| Error::Syntax(flag.to_string()))?;
    for (k, v) in &pairs {
        let v = v.as_str();
        match k.trim().to_ascii_lowercase().as_str() {
            "id" => id = Some(v.to_string()),
            "src" | "source" => src = Some(v.to_string()),
            "env" => env = Some(v.to_string()),
            "type" => match v {
                "file" | "env" => kind = Some(v.to_string()),
                _ => {
                    return Err(Error::Type {
                        flag: flag.to_string(),
                        value: v.to_string(),
                    })
                }
            },
            other => {
                return Err(Error::UnknownKey {
                    flag: flag.to_string(),
                    key: other.to_string(),
                })
            }
        }
    }
    let id = id
        .filter(|i| !i.is_empty())
        .ok_or_else(|| Error::Syntax(flag.to_string()))?;
    let origin = match (src, env, kind.as_deref()) {
        (Some(_), Some(_), _) => return Err(Error::Both(flag.to_string())),
        (Some(s), None, Some("env")) => Origin::Env(s),
        (Some(s), None, _) => Origin::File(PathBuf::from(s)),
        (None, Some(e), _) => Origin::Env(e),
        (None, None, Some("env")) => Origin::Env(id.clone()),
        (None, None, Some(_)) => Origin::File(PathBuf::from(&id)),
        (None, None, None) => Origin::Guess,
    };
    Ok((id, origin))
}

fn read_file(id: &str, path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    let err = |source| Error::Read {
        id: id.to_string(),
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(err)?;
    let size = f.metadata().map_err(err)?.len();
    if size > MAX_SECRET_SIZE {
        return Err(Error::TooLarge {
            id: id.to_string(),
            size,
        });
    }
    let mut buf = Zeroizing::new(Vec::with_capacity(usize::try_from(size).unwrap_or(0)));
    // One byte more than the limit tells a file that grew since the stat.
    f.take(MAX_SECRET_SIZE + 1)
        .read_to_end(&mut buf)
        .map_err(err)?;
    if buf.len() as u64 > MAX_SECRET_SIZE {
        return Err(Error::TooLarge {
            id: id.to_string(),
            size: buf.len() as u64,
        });
    }
    Ok(buf)
}

impl Secrets {
    /// Read every `--secret` flag; `env` looks up environment variables
    /// (the process environment in the CLI).
    pub fn load(flags: &[String], env: impl Fn(&str) -> Option<OsString>) -> Result<Secrets> {
        let mut values = BTreeMap::new();
        for flag in flags {
            let (id, origin) = parse_flag(flag)?;
            if values.contains_key(&id) {
                return Err(Error::Duplicate(id));
            }
            let value = match origin {
                Origin::File(p) => read_file(&id, &p)?,
                Origin::Env(var) => match env(&var) {
                    Some(v) => Zeroizing::new(v.into_encoded_bytes()),
                    None => return Err(Error::NoVariable { id, var }),
                },
                Origin::Guess => match env(&id) {
                    Some(v) => Zeroizing::new(v.into_encoded_bytes()),
                    None if Path::new(&id).exists() => read_file(&id, Path::new(&id))?,
                    None => return Err(Error::NotFound { id }),
                },
            };
            if value.len() as u64 > MAX_SECRET_SIZE {
                return Err(Error::TooLarge {
                    size: value.len() as u64,
                    id,
                });
            }
            values.insert(id, value);
        }
        Ok(Secrets { values })
    }

    /// The value of secret `id`, if the build was given it.
    pub fn get(&self, id: &str) -> Option<&Zeroizing<Vec<u8>>> {
        self.values.get(id)
    }

    /// A redactor for step output: every secret of the build is masked in
    /// every step, since a step not given a secret may still meet it (in a
    /// cache mount an earlier step filled, say).
    pub fn redactor(&self) -> Redactor {
        let mut needles = Vec::new();
        for v in self.values.values() {
            // the whole value, and each of its lines (output is line-based)
            let text = String::from_utf8_lossy(v);
            for n in std::iter::once(text.trim_end_matches('\n')).chain(text.lines()) {
                let n = n.trim();
                if !n.is_empty() && !needles.iter().any(|x: &Zeroizing<String>| **x == n) {
                    needles.push(Zeroizing::new(n.to_string()));
                }
            }
        }
        // longest first, so a line of a secret never leaves part of a
        // longer one visible
        needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
        Redactor { needles }
    }
}

/// Masks the values of the secrets a step was given in its output lines.
#[derive(Default)]
pub struct Redactor {
    needles: Vec<Zeroizing<String>>,
}

impl Redactor {
    /// `line` with every occurrence of a secret replaced by `****`.
    pub fn redact(&self, line: &str) -> String {
        let mut out = line.to_string();
        for n in &self.needles {
            if out.contains(n.as_str()) {
                out = out.replace(n.as_str(), "****");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<OsString> {
        None
    }

    #[test]
    fn flags_parse_as_buildkit() {
        assert_eq!(
            parse_flag("id=a,src=/f").unwrap(),
            ("a".into(), Origin::File("/f".into()))
        );
        assert_eq!(
            parse_flag("id=a,source=/f").unwrap(),
            ("a".into(), Origin::File("/f".into()))
        );
        assert_eq!(
            parse_flag("id=a,env=VAR").unwrap(),
            ("a".into(), Origin::Env("VAR".into()))
        );
        assert_eq!(
            parse_flag("id=a,type=env").unwrap(),
            ("a".into(), Origin::Env("a".into()))
        );
        assert_eq!(
            parse_flag("id=a,type=env,src=V").unwrap(),
            ("a".into(), Origin::Env("V".into()))
        );
        assert_eq!(parse_flag("id=a").unwrap(), ("a".into(), Origin::Guess));
        assert!(matches!(parse_flag("src=/f"), Err(Error::Syntax(_))));
        assert!(matches!(
            parse_flag("id=a,x=1"),
            Err(Error::UnknownKey { .. })
        ));
        assert!(matches!(
            parse_flag("id=a,src=f,env=V"),
            Err(Error::Both(_))
        ));
        assert!(matches!(parse_flag("id=a,type=x"), Err(Error::Type { .. })));
    }

    #[test]
    fn secrets_come_from_files_and_variables() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tok");
        std::fs::write(&f, b"s3cr3t-file\n").unwrap();
        let env = |k: &str| (k == "TOKEN").then(|| OsString::from("s3cr3t-env"));
        let s = Secrets::load(
            &[
                format!("id=f,src={}", f.display()),
                "id=e,env=TOKEN".into(),
                "id=TOKEN".into(),
            ],
            env,
        )
        .unwrap();
        assert_eq!(&s.get("f").unwrap()[..], b"s3cr3t-file\n");
        assert_eq!(&s.get("e").unwrap()[..], b"s3cr3t-env");
        assert_eq!(&s.get("TOKEN").unwrap()[..], b"s3cr3t-env");
        assert!(s.get("nope").is_none());
        // Debug shows ids, never values.
        let shown = format!("{s:?}");
        assert!(shown.contains("TOKEN") && !shown.contains("s3cr3t"));
    }

    #[test]
    fn bad_secrets_fail_naming_the_id() {
        let e = Secrets::load(&["id=x,src=/nonexistent/kiln".into()], no_env).unwrap_err();
        assert!(e.to_string().contains("id=x") && e.to_string().contains("/nonexistent/kiln"));
        let e = Secrets::load(&["id=x,env=NOPE".into()], no_env).unwrap_err();
        assert!(e.to_string().contains("NOPE"), "{e}");
        let e = Secrets::load(&["id=kiln-no-such-secret".into()], no_env).unwrap_err();
        assert!(matches!(e, Error::NotFound { .. }), "{e}");
        let e = Secrets::load(&["id=a,env=V".into(), "id=a,env=V".into()], |_| {
            Some("v".into())
        })
        .unwrap_err();
        assert!(matches!(e, Error::Duplicate(_)));

        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; 500 * 1024 + 1]).unwrap();
        let e = Secrets::load(&[format!("id=big,src={}", big.display())], no_env).unwrap_err();
        assert!(matches!(e, Error::TooLarge { .. }), "{e}");
    }

    #[test]
    fn redaction_masks_values_and_their_lines() {
        let s = Secrets::load(
            &["id=a,env=A".into(), "id=b,env=B".into()],
            |k: &str| match k {
                "A" => Some("hunter2".into()),
                "B" => Some("line-one\nline-two\n".into()),
                _ => None,
            },
        )
        .unwrap();
        let r = s.redactor();
        assert_eq!(r.redact("pw=hunter2!"), "pw=****!");
        assert_eq!(r.redact("x line-two y"), "x **** y");
        assert_eq!(r.redact("nothing here"), "nothing here");
    }
}
