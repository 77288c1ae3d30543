//! Platforms (`os[(version)]/arch[/variant]`) as BuildKit normalises them, and the
//! host's platform for `BUILDPLATFORM`.
//!
//! Only parsing and normalisation live here; choosing which platform a stage
//! runs on is the planner's job.

use std::fmt;

use serde::Serialize;

/// Why a platform string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlatformError {
    /// Empty, too many parts, or an empty part.
    #[error("invalid platform {0:?}; expected os/arch or os/arch/variant, e.g. linux/arm64")]
    Malformed(String),
}

/// An OCI platform.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Platform {
    /// `linux`, `windows`, ...
    pub os: String,
    /// GOARCH spelling: `amd64`, `arm64`, `arm`, `386`, ...
    pub architecture: String,
    /// `v7`, `v8`, ... when it matters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// The OS version (`10.0.20348.1006`), written `os(VERSION)/arch`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
}

impl Platform {
    /// Parse and normalise `os[(version)]/arch[/variant]` (or a bare
    /// `arch`, taken as Linux) the way containerd's platform parser does;
    /// the OS version keeps its case.
    pub fn parse(s: &str) -> Result<Self, PlatformError> {
        let bad = || PlatformError::Malformed(s.to_string());
        let s_trim = s.trim();
        let (os_version, rest) = match (s_trim.find('('), s_trim.find(')')) {
            (Some(open), Some(close)) if open < close && !s_trim[..open].contains('/') => {
                let v = &s_trim[open + 1..close];
                if v.is_empty() || v.contains('/') {
                    return Err(bad());
                }
                (
                    Some(v.to_string()),
                    format!("{}{}", &s_trim[..open], &s_trim[close + 1..]),
                )
            }
            (None, None) => (None, s_trim.to_string()),
            _ => return Err(bad()),
        };
        let lower = rest.to_ascii_lowercase();
        let parts: Vec<&str> = lower.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) || parts.len() > 3 {
            return Err(bad());
        }
        let (os, arch, variant) = match parts.as_slice() {
            [arch] if !is_os(arch) => ("linux", *arch, None),
            [os] => (*os, host_arch().0, None),
            [os, arch] => (*os, *arch, None),
            [os, arch, v] => (*os, *arch, Some(*v)),
            _ => return Err(bad()),
        };
        let (architecture, variant) = normalize_arch(arch, variant);
        Ok(Platform {
            os: os.to_string(),
            architecture,
            variant,
            os_version,
        })
    }

    /// The platform kiln itself runs on.
    pub fn host() -> Self {
        let (arch, variant) = host_arch();
        Platform {
            os: "linux".into(),
            architecture: arch.into(),
            variant: variant.map(str::to_string),
            os_version: None,
        }
    }

    /// `os/arch[/variant]`, without the OS version (containerd's Format;
    /// [`Display`](fmt::Display) is its FormatAll).
    pub fn without_os_version(&self) -> String {
        Platform {
            os_version: None,
            ..self.clone()
        }
        .to_string()
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.os)?;
        if let Some(v) = &self.os_version {
            write!(f, "({v})")?;
        }
        write!(f, "/{}", self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

fn is_os(s: &str) -> bool {
    matches!(
        s,
        "linux"
            | "windows"
            | "darwin"
            | "freebsd"
            | "netbsd"
            | "openbsd"
            | "solaris"
            | "illumos"
            | "aix"
            | "plan9"
    )
}

fn host_arch() -> (&'static str, Option<&'static str>) {
    match std::env::consts::ARCH {
        "x86_64" => ("amd64", None),
        "aarch64" => ("arm64", None),
        "x86" => ("386", None),
        "arm" => ("arm", Some("v7")),
        "powerpc64" => ("ppc64le", None),
        "s390x" => ("s390x", None),
        "riscv64" => ("riscv64", None),
        "loongarch64" => ("loong64", None),
        _ => ("amd64", None),
    }
}

fn normalize_arch(arch: &str, variant: Option<&str>) -> (String, Option<String>) {
    let v = variant.map(str::to_string);
    match arch {
        "i386" | "386" => ("386".into(), None),
        "x86_64" | "x86-64" | "amd64" => ("amd64".into(), v.filter(|v| v != "v1")),
        "aarch64" | "arm64" => ("arm64".into(), v.filter(|v| v != "v8" && v != "8")),
        "armhf" => ("arm".into(), Some("v7".into())),
        "armel" => ("arm".into(), Some("v6".into())),
        "arm" => {
            let v = match v.as_deref() {
                None | Some("7") => "v7".to_string(),
                Some("5") => "v5".into(),
                Some("6") => "v6".into(),
                Some("8") => "v8".into(),
                Some(other) => other.to_string(),
            };
            ("arm".into(), Some(v))
        }
        other => (other.to_string(), v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_like_containerd() {
        let p = |s| Platform::parse(s).unwrap().to_string();
        assert_eq!(p("linux/amd64"), "linux/amd64");
        assert_eq!(p("Linux/x86_64"), "linux/amd64");
        assert_eq!(p("linux/aarch64"), "linux/arm64");
        assert_eq!(p("linux/arm64/v8"), "linux/arm64");
        assert_eq!(p("linux/arm"), "linux/arm/v7");
        assert_eq!(p("linux/armhf"), "linux/arm/v7");
        assert_eq!(p("linux/arm/v6"), "linux/arm/v6");
        assert_eq!(p("arm64"), "linux/arm64");
        assert!(Platform::parse("linux//x").is_err());
        assert!(Platform::parse("").is_err());
        assert!(Platform::parse("a/b/c/d").is_err());
    }

    #[test]
    fn an_os_version_is_kept_in_parentheses() {
        let p = Platform::parse("windows(10.0.20348.1006)/AMD64").unwrap();
        assert_eq!(p.os, "windows");
        assert_eq!(p.os_version.as_deref(), Some("10.0.20348.1006"));
        assert_eq!(p.architecture, "amd64");
        assert_eq!(p.to_string(), "windows(10.0.20348.1006)/amd64");
        assert_eq!(p.without_os_version(), "windows/amd64");
        assert!(Platform::parse("windows()/amd64").is_err());
        assert!(Platform::parse("windows(1/amd64").is_err());
        assert!(Platform::parse("linux/amd64(1)").is_err());
    }

    #[test]
    fn host_is_linux() {
        assert_eq!(Platform::host().os, "linux");
    }
}
