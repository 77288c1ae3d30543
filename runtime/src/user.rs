//! Resolving `USER`-style names (`name`, `uid`, `name:group`, `uid:gid`) to
//! numeric ids from the rootfs's /etc/passwd and /etc/group.
//!
//! Nothing from the rootfs is ever executed (no NSS), and the files are
//! opened with RESOLVE_IN_ROOT, so a rootfs whose /etc/passwd is a symlink
//! to a host path reads its own tree, never the host's.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};
use crate::sys;

/// Numeric ids for a process, as Docker derives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
    /// groups from /etc/group that list the user by name
    pub additional_gids: Vec<u32>,
    /// the user's home directory, when /etc/passwd names one
    pub home: Option<String>,
}

struct Passwd {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

fn read_in_root(rootfs: &Path, path: &str) -> Result<String> {
    match sys::open_in_root(rootfs, path) {
        Ok(mut f) => {
            let mut s = String::new();
            // A file that is not UTF-8 is treated as empty: names from it
            // then fail to resolve with a clear error.
            let _ = f.read_to_string(&mut s);
            Ok(s)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(source) => Err(Error::ReadFile {
            path: rootfs.join(path.trim_start_matches('/')),
            source,
        }),
    }
}

fn parse_passwd(text: &str) -> Vec<Passwd> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some(Passwd {
                name: f[0].into(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].into(),
            })
        })
        .collect()
}

/// (name, gid, members) for every well-formed line of /etc/group.
fn parse_group(text: &str) -> Vec<(String, u32, Vec<String>)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            let members = f[3]
                .split(',')
                .filter(|m| !m.is_empty())
                .map(String::from)
                .collect();
            Some((f[0].into(), f[2].parse().ok()?, members))
        })
        .collect()
}

/// Resolve `spec` (`user[:group]`, names or numbers) against `rootfs`.
pub fn resolve(rootfs: &Path, spec: &str) -> Result<Ids> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() {
        return Err(Error::UnknownUser(spec.into()));
    }
    let passwd = parse_passwd(&read_in_root(rootfs, "/etc/passwd")?);
    let entry = match user.parse::<u32>() {
        Ok(uid) => passwd.iter().find(|p| p.uid == uid),
        Err(_) => Some(
            passwd
                .iter()
                .find(|p| p.name == user)
                .ok_or_else(|| Error::UnknownUser(user.into()))?,
        ),
    };
    let uid = entry.map_or_else(|| user.parse().unwrap_or(0), |p| p.uid);
    // A uid with no passwd entry runs with group root, as in Docker.
    let primary = entry.map_or(0, |p| p.gid);

    let groups = if group.is_some() || entry.is_some() {
        parse_group(&read_in_root(rootfs, "/etc/group")?)
    } else {
        Vec::new()
    };
    let gid = match group {
        None => primary,
        Some(g) if g.is_empty() => return Err(Error::UnknownGroup(g.into())),
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => groups
                .iter()
                .find(|(n, _, _)| n == g)
                .map(|(_, id, _)| *id)
                .ok_or_else(|| Error::UnknownGroup(g.into()))?,
        },
    };
    // The primary group is always a supplementary one (containerd's fix
    // of CVE-2023-25173, which BuildKit follows: dropping a group must not
    // be bypassed by a file whose group has fewer rights than others);
    // the groups that list the user only when the group was not given
    // explicitly, as Docker does.
    let mut additional_gids = vec![gid];
    if let (Some(p), None) = (entry, group) {
        for (_, id, members) in &groups {
            if members.contains(&p.name) && *id != gid && !additional_gids.contains(id) {
                additional_gids.push(*id);
            }
        }
    }
    Ok(Ids {
        uid,
        gid,
        additional_gids,
        home: entry.map(|p| p.home.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rootfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\nbroken line\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\nuser:x:1000:\nwheel:x:10:user,other\naudio:x:29:user\n",
        )
        .unwrap();
        dir
    }

    #[test]
    fn names_and_numbers() {
        let r = rootfs();
        let ids = resolve(r.path(), "user").unwrap();
        assert_eq!(
            (ids.uid, ids.gid, ids.additional_gids.clone()),
            (1000, 1000, vec![1000, 10, 29])
        );
        assert_eq!(ids.home.as_deref(), Some("/home/user"));
        assert_eq!(resolve(r.path(), "1000").unwrap().gid, 1000);
        let ids = resolve(r.path(), "4242").unwrap();
        assert_eq!((ids.uid, ids.gid), (4242, 0));
        assert_eq!(resolve(r.path(), "4242").unwrap().additional_gids, [0]);
        let ids = resolve(r.path(), "user:wheel").unwrap();
        assert_eq!(
            (ids.uid, ids.gid, ids.additional_gids),
            (1000, 10, vec![10])
        );
        assert_eq!(resolve(r.path(), "5:7").unwrap().gid, 7);
    }

    #[test]
    fn unknown_names_are_errors() {
        let r = rootfs();
        assert!(matches!(
            resolve(r.path(), "nobody"),
            Err(Error::UnknownUser(_))
        ));
        assert!(matches!(
            resolve(r.path(), "user:nogroup"),
            Err(Error::UnknownGroup(_))
        ));
        assert!(matches!(
            resolve(r.path(), ":0"),
            Err(Error::UnknownUser(_))
        ));
    }

    #[test]
    fn passwd_symlink_does_not_reach_the_host() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        // Followed naively this reaches the host's /etc/hostname; resolved
        // inside the root it reaches the rootfs's own etc/hostname.
        std::fs::write(dir.path().join("etc/hostname"), "alice:x:5:6::/:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink(
            "../../../../../../../../../../etc/hostname",
            dir.path().join("etc/passwd"),
        )
        .unwrap();
        let ids = resolve(dir.path(), "alice").unwrap();
        assert_eq!((ids.uid, ids.gid), (5, 6));
    }
}
