//! The user-mode network stack behind [`crate::Network::Sandbox`]: which
//! helper kiln uses (pasta, else slirp4netns), the resolv.conf and hosts
//! files a sandbox gets with it, and starting the helper on the sandbox's
//! network namespace.
//!
//! The helper runs as the calling user in kiln's own namespaces, outside
//! every namespace of the sandbox: it owns a tap device inside the sandbox's
//! network namespace and turns the frames it reads into ordinary sockets of
//! the user. It is started after the clone (the namespace must exist) and
//! before the child is released (the network must be up before the user's
//! command runs), and it dies with the sandbox and with kiln.
//!
//! This module never touches the sandbox's filesystem: the caller places
//! [`Stack::resolv_conf`] and [`hosts_file`] where the sandbox sees them.

use std::io::{Read, Seek};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout};

use crate::error::{Error, Result};

/// Environment variable that forces one helper: `pasta` or `slirp4netns`
/// (used by the tests of the fallback, and by users whose pasta misbehaves).
pub const STACK_ENV: &str = "KILN_NETWORK_STACK";

/// Annotation that asks [`crate::run`] for a user-mode network stack on the
/// sandbox's new network namespace: `sandbox`, or `sandbox+host-loopback`
/// to let the sandbox reach the host's loopback through the gateway.
pub const NETWORK_ANNOTATION: &str = "run.kiln.network";

/// How long a helper may take to configure the namespace.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// pasta's IPv4 DNS forwarder address in the sandbox (`--dns-forward`):
/// pasta sends what reaches it to the host's first IPv4 resolver, from the
/// host's network namespace, so a resolver on the host's loopback
/// (systemd-resolved's 127.0.0.53) works. Podman picks the same address.
const PASTA_DNS_FORWARD: &str = "169.254.1.1";
/// pasta's IPv6 DNS forwarder, for the host's first IPv6 resolver: an
/// address of a unique local prefix of kiln's own (fd00:6b69:6c6e::/48,
/// "kiln"), which no real network routes to the sandbox.
const PASTA_DNS6_FORWARD: &str = "fd00:6b69:6c6e::53";
/// slirp4netns's built-in DNS forwarder, for the host's first IPv4
/// resolver.
const SLIRP_DNS: &str = "10.0.2.3";
/// The most nameservers glibc's and musl's resolvers read (MAXNS).
const MAX_NAMESERVERS: usize = 3;

/// A user-mode network stack kiln can start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stack {
    /// pasta, from the passt package
    Pasta(PathBuf),
    /// slirp4netns
    Slirp4netns(PathBuf),
}

impl Stack {
    /// The helper to use: the one [`STACK_ENV`] names, else pasta, else
    /// slirp4netns, searched in `PATH`.
    /// Searched once per process (neither the variable nor `PATH` changes
    /// under kiln's feet), not once per step.
    pub fn detect() -> Result<Stack> {
        // Err(None): none installed; Err(Some(name)): an unknown name
        static DETECTED: std::sync::OnceLock<std::result::Result<Stack, Option<String>>> =
            std::sync::OnceLock::new();
        match DETECTED.get_or_init(|| {
            Self::search().map_err(|e| match e {
                Error::NetworkStackUnknown(name) => Some(name),
                _ => None,
            })
        }) {
            Ok(stack) => Ok(stack.clone()),
            Err(None) => Err(Error::NetworkStackMissing),
            Err(Some(name)) => Err(Error::NetworkStackUnknown(name.clone())),
        }
    }

    fn search() -> Result<Stack> {
        let path =
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
        let find = |name: &str| {
            std::env::split_paths(&path)
                .map(|d| d.join(name))
                .find(|p| is_executable(p))
        };
        let pasta = || find("pasta").map(Stack::Pasta);
        let slirp = || find("slirp4netns").map(Stack::Slirp4netns);
        match std::env::var(STACK_ENV).ok().as_deref() {
            None | Some("") => pasta().or_else(slirp).ok_or(Error::NetworkStackMissing),
            Some("pasta") => pasta().ok_or(Error::NetworkStackMissing),
            Some("slirp4netns") => slirp().ok_or(Error::NetworkStackMissing),
            Some(other) => Err(Error::NetworkStackUnknown(other.to_string())),
        }
    }

    /// The helper's program name.
    pub fn name(&self) -> &'static str {
        match self {
            Stack::Pasta(_) => "pasta",
            Stack::Slirp4netns(_) => "slirp4netns",
        }
    }

    /// The address in the sandbox that forwards DNS queries to the host's
    /// first IPv4 resolver.
    pub fn dns_forwarder(&self) -> &'static str {
        match self {
            Stack::Pasta(_) => PASTA_DNS_FORWARD,
            Stack::Slirp4netns(_) => SLIRP_DNS,
        }
    }

    /// The forwarder for the host's first IPv6 resolver, where the stack
    /// has one (slirp4netns runs without IPv6 here).
    fn dns6_forwarder(&self) -> Option<&'static str> {
        match self {
            Stack::Pasta(_) => Some(PASTA_DNS6_FORWARD),
            Stack::Slirp4netns(_) => None,
        }
    }

    /// The sandbox's /etc/resolv.conf, made from the host's (`host` is its
    /// text), in the host's order:
    /// - the host's first resolver of each address family becomes the
    ///   stack's forwarder for that family. The forwarder reaches it from
    ///   the host's network namespace, so a loopback resolver works; and
    ///   pasta rewrites every answer of that resolver to come from its
    ///   forwarder, so naming it directly would never get an answer.
    /// - the others stay as they are where the sandbox can reach them
    ///   directly: not on the host's loopback, not link-local (blocked in
    ///   the sandbox), and not an IPv6 address under slirp4netns.
    /// - at most three, as the C libraries read no more.
    /// - `search`, `domain` and `options` lines as they are.
    ///
    /// A host without any resolver gets the IPv4 forwarder, which then has
    /// nothing to forward to, as the host itself cannot resolve.
    pub fn resolv_conf(&self, host: &str) -> String {
        let mut servers: Vec<String> = Vec::new();
        let mut rest = Vec::new();
        let (mut seen_v4, mut seen_v6) = (false, false);
        for line in host.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    // an IPv6 address may carry a zone (fe80::1%eth0)
                    let Some(addr) = words.next() else { continue };
                    let Ok(ip) = addr
                        .split('%')
                        .next()
                        .unwrap_or_default()
                        .parse::<std::net::IpAddr>()
                    else {
                        continue;
                    };
                    let first = if ip.is_ipv4() {
                        !std::mem::replace(&mut seen_v4, true)
                    } else {
                        !std::mem::replace(&mut seen_v6, true)
                    };
                    let entry = match (first, ip.is_ipv4()) {
                        (true, true) => Some(self.dns_forwarder().to_string()),
                        (true, false) => self.dns6_forwarder().map(str::to_string),
                        (false, v4) => (direct_resolver(ip)
                            && (v4 || self.dns6_forwarder().is_some()))
                        .then(|| ip.to_string()),
                    };
                    if let Some(e) = entry.filter(|e| !servers.contains(e)) {
                        servers.push(e);
                    }
                }
                Some("search" | "domain" | "options") => rest.push(line.trim().to_string()),
                _ => {}
            }
        }
        if servers.is_empty() {
            servers.push(self.dns_forwarder().to_string());
        }
        servers.truncate(MAX_NAMESERVERS);
        let mut out = String::from("# written by kiln for --network=sandbox\n");
        for s in servers {
            out.push_str(&format!("nameserver {s}\n"));
        }
        for l in rest {
            out.push_str(&l);
            out.push('\n');
        }
        out
    }
}

/// Whether a sandbox can ask the resolver at `ip` itself (through the
/// stack's ordinary forwarding): not on the host's loopback, which the
/// sandbox's own loopback hides, and not link-local, which is blocked.
fn direct_resolver(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => {
            !(v4.is_loopback() || v4.is_unspecified() || v4.is_link_local())
        }
        std::net::IpAddr::V6(v6) => {
            !(v6.is_loopback() || v6.is_unspecified() || v6.is_unicast_link_local())
        }
    }
}

/// Run `f` on a thread of its own whose network namespace is what a step
/// under `sandbox` gets: a new namespace with loopback up, the same
/// prohibit rules (unless `allow_host_loopback`), and `stack` serving it.
/// Every socket `f` makes on that thread is in the namespace, so what a
/// step cannot reach, `f` cannot either (kiln's own downloads for a
/// build: `ADD <url>`). Sockets made on other threads (a resolver's
/// worker) stay in kiln's namespace. The helper dies when `f` returns.
pub fn in_sandbox_network<T: Send>(
    stack: &Stack,
    allow_host_loopback: bool,
    f: impl FnOnce() -> T + Send,
) -> Result<T> {
    let fail = |what| move |errno| Error::NetworkPolicy { what, errno };
    // the host's addresses, read here: the worker's namespace has none
    let blocked = if allow_host_loopback {
        crate::sys::Blocked::default()
    } else {
        blocked(stack)?
    };
    // The worker makes the namespace and says where it is; the helper is
    // started from this thread, which stays in kiln's namespace (a helper
    // forked from the worker would run inside the empty namespace it is
    // meant to serve); then the worker runs `f`.
    // (kiln is not dumpable, so the helper cannot open the thread's
    // /proc/PID/task/TID/ns/net: it gets a descriptor of it instead)
    let (ns_tx, ns_rx) = std::sync::mpsc::channel::<Result<std::os::fd::OwnedFd>>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<bool>();
    std::thread::scope(|scope| {
        let worker = scope.spawn(move || {
            let made = (|| {
                // SAFETY: unshare(CLONE_NEWNET) changes only this thread's
                // network namespace; it touches no memory of ours.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(fail("unshare")(nix::errno::Errno::last()));
                }
                crate::sys::loopback_up().map_err(fail("bringing up loopback"))?;
                if !blocked.prefixes.is_empty() {
                    crate::sys::block(&blocked)
                        .map_err(fail("blocking link-local and host addresses"))?;
                }
                nix::fcntl::open(
                    "/proc/thread-self/ns/net",
                    nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
                    nix::sys::stat::Mode::empty(),
                )
                .map(|fd| {
                    // SAFETY: `fd` is the descriptor open just returned
                    // (Ok): open, and owned by nothing else.
                    unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
                })
                .map_err(fail("opening the namespace"))
            })();
            let ok = made.is_ok();
            let _ = ns_tx.send(made);
            // run only once the helper serves the namespace
            (ok && go_rx.recv() == Ok(true)).then(f)
        });
        let helper = ns_rx
            .recv()
            .map_err(|_| fail("the worker thread")(nix::errno::Errno::ESRCH))
            .and_then(|made| made)
            .and_then(|netns| {
                use std::os::fd::AsRawFd;
                let fd = netns.as_raw_fd();
                Helper::start_on(
                    stack,
                    &format!("/proc/self/fd/{fd}"),
                    Some(fd),
                    allow_host_loopback,
                )
            });
        let _ = go_tx.send(helper.is_ok());
        let out = worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        // the helper dies here, after `f` is done with the namespace
        drop(helper?);
        out.ok_or_else(|| fail("the worker thread")(nix::errno::Errno::ESRCH))
    })
}

/// What a step under `sandbox` must not reach unless the build allows the
/// host's loopback: link-local addresses (169.254.0.0/16, where clouds
/// serve instance metadata and credentials, and fe80::/10) but DNS to the
/// stack's forwarder, and every address of the host's own interfaces but
/// loopback (services bound to 0.0.0.0 on the runner). Read from the
/// calling thread's network namespace: the host's.
pub fn blocked(stack: &Stack) -> Result<crate::sys::Blocked> {
    let host: Vec<std::net::IpAddr> = nix::ifaddrs::getifaddrs()
        .map_err(|errno| Error::NetworkPolicy {
            what: "listing the host's addresses",
            errno,
        })?
        .filter_map(|a| {
            let a = a.address?;
            a.as_sockaddr_in()
                .map(|s| std::net::IpAddr::V4(s.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|s| std::net::IpAddr::V6(s.ip())))
        })
        .collect();
    Ok(blocked_for(stack.dns_forwarder().parse().ok(), &host))
}

/// [`blocked`] for a stack whose IPv4 DNS forwarder is `forwarder`, on a
/// host with the addresses `host`.
fn blocked_for(
    forwarder: Option<std::net::Ipv4Addr>,
    host: &[std::net::IpAddr],
) -> crate::sys::Blocked {
    use crate::sys::Prefix;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let mut prefixes = vec![
        Prefix::new(IpAddr::V4(Ipv4Addr::new(169, 254, 0, 0)), 16),
        Prefix::new(IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0)), 10),
    ];
    for ip in host {
        let covered = match ip {
            IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local() || v4.is_unspecified(),
            IpAddr::V6(v6) => v6.is_loopback() || v6.is_unicast_link_local() || v6.is_unspecified(),
        };
        let p = Prefix::new(*ip, if ip.is_ipv4() { 32 } else { 128 });
        if !covered && !prefixes.contains(&p) {
            prefixes.push(p);
        }
    }
    crate::sys::Blocked {
        prefixes,
        // only a forwarder inside a blocked prefix needs a way through
        dns_forwarder: forwarder
            .filter(|f| f.is_link_local())
            .map(|f| Prefix::new(IpAddr::V4(f), 32)),
    }
}

/// The sandbox's /etc/hosts: localhost on both loopback addresses (what
/// BuildKit provides), then `extra` (`--add-host NAME:IP`) in order.
pub fn hosts_file(hostname: &str, extra: &[(String, std::net::IpAddr)]) -> String {
    let mut out =
        format!("127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    for (name, ip) in extra {
        out.push_str(&format!("{ip}\t{name}\n"));
    }
    out
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A running helper; killed and reaped when dropped.
#[derive(Debug)]
pub(crate) struct Helper {
    /// `None` once handed to the reaper
    child: Option<Child>,
}

impl Drop for Helper {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = child.kill();
        // The helper's exit closes its tap device, and the kernel
        // unregisters it synchronously in that exit (tens of milliseconds
        // of RCU grace periods, measured): reap it off the step's path. If
        // no thread can be made, the zombie is reaped when kiln exits.
        let _ = std::thread::Builder::new()
            .name("kiln-net-reap".into())
            .spawn(move || child.wait());
    }
}

/// The helper's command line for the network namespace at `netns`,
/// `ready` being the descriptor it signals readiness on.
fn command(stack: &Stack, netns: &str, allow_host_loopback: bool, ready: i32) -> Command {
    match stack {
        Stack::Pasta(bin) => {
            let mut c = Command::new(bin);
            // Root in kiln's user namespace is the user outside: say so, or
            // pasta, seeing uid 0, may try to drop to "nobody".
            // SAFETY: geteuid/getegid cannot fail.
            let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
            c.args(["--config-net", "--foreground", "--quiet"])
                .args(["--runas", &format!("{uid}:{gid}")])
                .args(["--netns", netns])
                // No port forwarding in either direction: pasta's default
                // ("auto") would make every port bound on the host's
                // loopback reachable at the sandbox's own 127.0.0.1.
                .args(["-t", "none", "-u", "none", "-T", "none", "-U", "none"])
                .args(["--dns-forward", PASTA_DNS_FORWARD])
                .args(["--dns-forward", PASTA_DNS6_FORWARD])
                // pasta writes its pid once the namespace is configured
                .args(["--pid", &format!("/proc/self/fd/{ready}")]);
            if !allow_host_loopback {
                // by default pasta maps the gateway address to the host's
                // loopback
                c.arg("--no-map-gw");
            }
            c
        }
        Stack::Slirp4netns(bin) => {
            let mut c = Command::new(bin);
            c.args([
                "--configure",
                "--mtu=65520",
                "--enable-sandbox",
                "--enable-seccomp",
            ])
            .arg(format!("--ready-fd={ready}"))
            .args(["--netns-type=path", netns, "tap0"]);
            if !allow_host_loopback {
                c.arg("--disable-host-loopback");
            }
            c
        }
    }
}

impl Helper {
    /// Start `stack` on the network namespace of `pid` and wait until it
    /// has configured it.
    pub(crate) fn start(stack: &Stack, pid: i32, allow_host_loopback: bool) -> Result<Helper> {
        Self::start_on(
            stack,
            &format!("/proc/{pid}/ns/net"),
            None,
            allow_host_loopback,
        )
    }

    /// Start `stack` on the network namespace at the path `netns`;
    /// `inherit` is a descriptor the helper keeps across exec (the
    /// namespace, named `/proc/self/fd/N`).
    fn start_on(
        stack: &Stack,
        netns: &str,
        inherit: Option<std::os::fd::RawFd>,
        allow_host_loopback: bool,
    ) -> Result<Helper> {
        let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| Error::Channel(e.into()))?;
        let log = nix::sys::memfd::memfd_create(
            c"kiln-network-log",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .map_err(|e| Error::Channel(e.into()))?;
        let mut log = std::fs::File::from(log);
        let ready_fd = ready_w.as_raw_fd();
        let mut cmd = command(stack, netns, allow_host_loopback, ready_fd);
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log.try_clone().map_err(Error::Channel)?);
        // SAFETY: getpid cannot fail.
        let kiln = unsafe { libc::getpid() };
        // SAFETY: the closure runs between fork and exec and calls only
        // async-signal-safe functions (fcntl, prctl, getppid, _exit) on
        // `ready_fd` and `inherit`, which stay open in the parent until
        // spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                // the readiness pipe survives exec, nothing else of ours
                if libc::fcntl(ready_fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = inherit {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // Die with kiln, even when kiln is SIGKILLed; a kiln that
                // died before this point is caught by the ppid check.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != kiln {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| Error::NetworkStackStart {
            stack: stack.name(),
            source,
        })?;
        drop(ready_w);
        let mut helper = Helper { child: Some(child) };

        let mut fds = [PollFd::new(
            std::os::fd::AsFd::as_fd(&ready_r),
            PollFlags::POLLIN,
        )];
        let timeout = PollTimeout::try_from(READY_TIMEOUT.as_millis()).unwrap_or(PollTimeout::MAX);
        let ready = loop {
            match nix::poll::poll(&mut fds, timeout) {
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(Error::Channel(e.into())),
                Ok(0) => break Err("did not configure the network within 10s".to_string()),
                Ok(_) => {
                    let mut b = [0u8; 1];
                    break match nix::unistd::read(ready_r.as_raw_fd(), &mut b) {
                        Ok(1) => Ok(()),
                        _ => Err("exited before configuring the network".to_string()),
                    };
                }
            }
        };
        if let Err(what) = ready {
            let mut status = String::new();
            if let Some(mut child) = helper.child.take() {
                let _ = child.kill();
                status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            }
            let mut text = String::new();
            let _ = log.rewind();
            let _ = log.read_to_string(&mut text);
            let mut stderr = text
                .lines()
                .filter(|l| !l.contains("to syslog") && !l.trim().is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            // both stacks need the tun device; in a container it is often
            // simply not there
            let tun = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun");
            if let Err(e) = tun {
                stderr.push_str(&format!(
                    " (/dev/net/tun cannot be opened here: {e}. In a container, give it the device: \
                     podman/docker --device /dev/net/tun, Kubernetes a hostPath or device plugin for /dev/net/tun)"
                ));
            }
            return Err(Error::NetworkStack {
                stack: stack.name(),
                what,
                status,
                stderr,
            });
        }
        Ok(helper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_covers_link_local_and_the_host_but_dns_to_the_forwarder() {
        let host: Vec<std::net::IpAddr> = [
            "127.0.0.1",
            "192.0.2.2",
            "10.53.0.1",
            "::1",
            "fd00::2",
            "fe80::1",
            "169.254.3.3",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        let text =
            |b: &crate::sys::Blocked| b.prefixes.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        let want = [
            "169.254.0.0/16",
            "fe80::/10",
            "192.0.2.2/32",
            "10.53.0.1/32",
            "fd00::2/128",
        ];
        let slirp = blocked_for(Some("10.0.2.3".parse().unwrap()), &host);
        assert_eq!(text(&slirp), want);
        assert_eq!(slirp.dns_forwarder, None, "10.0.2.3 is not blocked");
        let pasta = blocked_for(Some("169.254.1.1".parse().unwrap()), &host);
        assert_eq!(text(&pasta), want);
        assert_eq!(
            pasta.dns_forwarder.map(|p| p.to_string()).as_deref(),
            Some("169.254.1.1/32")
        );
    }

    /// The nameserver lines of a resolv.conf.
    fn nameservers(text: &str) -> Vec<&str> {
        text.lines()
            .filter_map(|l| l.strip_prefix("nameserver "))
            .collect()
    }

    #[test]
    fn resolv_conf_for_every_resolver_layout() {
        let pasta = Stack::Pasta("/usr/bin/pasta".into());
        let slirp = Stack::Slirp4netns("/usr/bin/slirp4netns".into());
        // (host's resolv.conf, pasta's nameservers, slirp4netns's)
        let cases: &[(&str, &[&str], &[&str])] = &[
            // systemd-resolved
            (
                "nameserver 127.0.0.53\n",
                &["169.254.1.1"],
                &["10.0.2.3"],
            ),
            // a cloud or LAN resolver: pasta answers it only through its
            // forwarder (it rewrites the resolver's answers)
            ("nameserver 10.255.255.53\n", &["169.254.1.1"], &["10.0.2.3"]),
            // several: the first through the forwarder, the others direct
            (
                "nameserver 10.1.1.1\nnameserver 10.2.2.2\nnameserver 127.0.0.1\nnameserver 10.3.3.3\n",
                &["169.254.1.1", "10.2.2.2", "10.3.3.3"],
                &["10.0.2.3", "10.2.2.2", "10.3.3.3"],
            ),
            // IPv6 only
            (
                "nameserver 2001:db8::53\nnameserver 2001:db8::54\n",
                &["fd00:6b69:6c6e::53", "2001:db8::54"],
                &["10.0.2.3"],
            ),
            ("nameserver ::1\n", &["fd00:6b69:6c6e::53"], &["10.0.2.3"]),
            // both families, in the host's order
            (
                "nameserver fd53::1\nnameserver 10.53.0.1\nnameserver 10.53.0.2\nnameserver 10.53.0.3\n",
                &["fd00:6b69:6c6e::53", "169.254.1.1", "10.53.0.2"],
                &["10.0.2.3", "10.53.0.2", "10.53.0.3"],
            ),
            // link-local resolvers are blocked in the sandbox, zones allowed
            (
                "nameserver 10.0.0.1\nnameserver 169.254.169.253\nnameserver fe80::1%eth0\n",
                &["169.254.1.1", "fd00:6b69:6c6e::53"],
                &["10.0.2.3"],
            ),
            // nothing usable: the forwarder
            ("", &["169.254.1.1"], &["10.0.2.3"]),
            ("nameserver bogus\n", &["169.254.1.1"], &["10.0.2.3"]),
        ];
        for (host, want_pasta, want_slirp) in cases {
            assert_eq!(
                nameservers(&pasta.resolv_conf(host)),
                *want_pasta,
                "pasta, {host:?}"
            );
            assert_eq!(
                nameservers(&slirp.resolv_conf(host)),
                *want_slirp,
                "slirp4netns, {host:?}"
            );
        }
    }

    #[test]
    fn resolv_conf_keeps_search_and_options() {
        let s = Stack::Pasta("/usr/bin/pasta".into());
        let out = s.resolv_conf(
            "# comment\nnameserver 10.1.2.3\nsearch example.org corp.example\ndomain example.org\noptions edns0 ndots:2\n",
        );
        assert!(out.contains("search example.org corp.example\n"), "{out}");
        assert!(out.contains("domain example.org\n"), "{out}");
        assert!(out.contains("options edns0 ndots:2\n"), "{out}");
        assert!(!out.contains("comment"), "{out}");
    }

    #[test]
    fn pasta_never_forwards_ports_and_maps_the_gateway_only_when_allowed() {
        let s = Stack::Pasta("/usr/bin/pasta".into());
        let args = |allow| {
            command(&s, "/proc/42/ns/net", allow, 7)
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        };
        let denied = args(false);
        assert!(denied.contains(&"--no-map-gw".to_string()));
        assert!(denied.windows(2).any(|w| w == ["-T", "none"]));
        assert!(denied
            .windows(2)
            .any(|w| w == ["--netns", "/proc/42/ns/net"]));
        assert!(!args(true).contains(&"--no-map-gw".to_string()));
        let slirp = Stack::Slirp4netns("/usr/bin/slirp4netns".into());
        let has = |allow| {
            command(&slirp, "/proc/42/ns/net", allow, 7)
                .get_args()
                .any(|a| a == "--disable-host-loopback")
        };
        assert!(has(false));
        assert!(!has(true));
    }
}
