#!/usr/bin/env bash
# Install what kiln and its tests need on a Debian 12 host, idempotently.
# Run as root (or with sudo available). Everything here is what a standard
# distribution already ships or what `apt-get install` gives:
#  - uidmap (newuidmap/newgidmap) for subordinate id ranges
#  - busybox-static and libc6-dev/gcc for test root filesystems and the
#    static programs the tests and the runtime compile
#  - fuse3 for /dev/fuse, fuse-overlayfs/skopeo/umoci/podman/buildah for
#    interop tests and benchmarks; runc because crun refuses hybrid cgroup
#    hosts, where the podman interop test runs `podman --runtime runc`
#  - liblzma-dev and pkg-config for ADD's xz decoding (liblzma-sys links
#    the system library), xz-utils, bzip2 and zstd to make test archives
#  - g++ for libfuzzer-sys, which compiles libFuzzer's C++ for the fuzz
#    targets scripts/fuzz.sh builds
#  - qemu-user-static for emulated RUN steps of multi-platform builds, and
#    Debian's busybox-static:arm64 .deb in /var/tmp/kiln-fixtures as the
#    arm64 base image of the platform tests
#  - openssh-client, openssh-server (ssh-keygen, ssh-agent, ssh-add, sshd) for the `--ssh` agent tests
#  - passt (pasta) and slirp4netns: the user-mode network stacks of
#    `--network=sandbox` (pasta preferred; the tests cover both)
#  - dnsmasq-base: test resolvers for the DNS layouts of --network=sandbox
#  - docker-registry, apache2-utils (htpasswd), openssl and curl for the
#    registry tests (a local registry, plain HTTP and TLS with a private CA)
#  - docker.io and rootlesskit for the rootless Docker test of kiln's
#    image (the rootful daemon is not started: a policy-rc.d denies it
#    during the install, and its units are disabled)
#  - qemu-system-x86 and Debian 12's kernel image (unpacked in
#    /var/tmp/kiln-fixtures/kernel, not installed) for the cgroup limit
#    test, which boots it with cgroup v2 alone (these hosts are hybrid)
#  - AppArmor 4's apparmor_parser (Debian 13's, with its glibc, unpacked
#    in /var/tmp/kiln-fixtures/apparmor4, not installed: Debian 12's 3.0
#    does not know the `userns` rule) to check deploy/apparmor/kiln
# and /dev/fuse and /dev/net/tun are made 0666, as standard distributions
# ship them (some CI machines have them 0600).
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "setup-host.sh: run as root or install sudo" >&2; exit 1; }
    SUDO=sudo
fi
PKGS="uidmap dnsmasq-base fuse3 busybox-static gcc libc6-dev skopeo umoci fuse-overlayfs bubblewrap crun runc podman hyperfine jq git
      iproute2 procps util-linux zstd debootstrap xz-utils bzip2 liblzma-dev pkg-config openssh-client openssh-server passt slirp4netns
      docker-registry apache2-utils openssl curl g++ qemu-user-static qemu-system-x86 binutils"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
# rootless Docker only: the system daemon must not start (its iptables
# rules and bridge would change the network the other tests see)
for p in docker.io rootlesskit; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup-host.sh: installing$missing"
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
        $SUDO chmod 755 /usr/sbin/policy-rc.d
        # removed however the install ends: it would block later installs
        trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    $SUDO apt-get update -q
    # shellcheck disable=SC2086
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
    # a docker.io installed here (not one the host had) stays off
    case " $missing " in
    *" docker.io "*)
        if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
            $SUDO systemctl disable --now docker.service docker.socket containerd.service >/dev/null 2>&1 || true
        fi ;;
    esac
fi
for dev in /dev/fuse /dev/net/tun; do
    [ -e "$dev" ] && $SUDO chmod 0666 "$dev"
done
FIXTURES=/var/tmp/kiln-fixtures
if ! ls "$FIXTURES"/busybox-static_*_arm64.deb >/dev/null 2>&1; then
    dpkg --print-foreign-architectures | grep -qx arm64 || { $SUDO dpkg --add-architecture arm64; $SUDO apt-get update -q; }
    $SUDO mkdir -p "$FIXTURES"
    (cd "$FIXTURES" && $SUDO apt-get download -q busybox-static:arm64)
    $SUDO chmod -R a+rX "$FIXTURES"
fi
KERNEL="$FIXTURES/kernel"
if ! ls "$KERNEL"/boot/vmlinuz-* >/dev/null 2>&1; then
    image=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
    $SUDO mkdir -p "$KERNEL"
    (cd "$KERNEL" && $SUDO apt-get download -q "$image" && \
        dpkg-deb --fsys-tarfile "$image"_*.deb | $SUDO tar -x --wildcards './boot/vmlinuz-*' && \
        $SUDO rm -f "$image"_*.deb)
    $SUDO chmod -R a+rX "$KERNEL"
fi
AA="$FIXTURES/apparmor4"
if [ ! -x "$AA/usr/sbin/apparmor_parser" ]; then
    apt_dir=$(mktemp -d)
    echo "deb http://deb.debian.org/debian trixie main" > "$apt_dir/sources.list"
    apt_opts=(-q -o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
              -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache")
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
    $SUDO apt-get "${apt_opts[@]}" update
    (cd "$apt_dir" && $SUDO apt-get "${apt_opts[@]}" download apparmor libc6)
    $SUDO mkdir -p "$AA"
    for deb in "$apt_dir"/*.deb; do $SUDO dpkg-deb -x "$deb" "$AA"; done
    $SUDO chmod -R a+rX "$AA"
    $SUDO rm -rf "$apt_dir"
fi
exit 0
