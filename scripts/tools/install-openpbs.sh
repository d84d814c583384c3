#!/usr/bin/env bash
# Build and install OpenPBS 23.06 (commit cd7ab5eda) into /opt/pbs, for the tests that
# start a real PBS server with four execution hosts on loopback (tests/pbs_cluster.py).
# Recipe: ../shared/notes/openpbs.md. Needs root. Idempotent: when /opt/pbs/.build-stamp
# names the same source and the same patch, nothing is done (well under a second);
# a full build takes minutes.
#
# Source, first found: $OPENPBS_TARBALL, ../shared/vendor/openpbs-cd7ab5eda.tar.gz
# (relative to the repository), else GitHub's archive of the commit. A tarball is used
# only if its sha256 is the pinned one, or (GitHub renames the top folder, so its
# bytes differ) if the files inside are exactly those of the pinned tarball.
#
# Usage: install-openpbs.sh          build and install if needed
#        install-openpbs.sh --check  exit 0 if installed and up to date, 1 if not
set -euo pipefail

OPENPBS_COMMIT=cd7ab5edaf03dcac2f1cb9e2f42d75eb117d468a
# sha256 of ../shared/vendor/openpbs-cd7ab5eda.tar.gz
SOURCE_SHA256=60230d9d364904ba51a2a6c8033d6b58e06ad350080a63bdd46a70baf54bfab8
# tree_digest (below) of the files in that tarball, whatever the top folder is called
SOURCE_TREE_SHA256=1b8484727c5685c8ea5757e0b958ff74f4e8e25208529e61cb75db5f48538b8b
SOURCE_URL="https://github.com/openpbs/openpbs/archive/${OPENPBS_COMMIT}.tar.gz"
PREFIX=/opt/pbs
STAMP="$PREFIX/.build-stamp"
BUILD_DIR=${OPENPBS_BUILD_DIR:-/var/tmp/openpbs-build}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENDOR_TARBALL="$REPO/../shared/vendor/openpbs-cd7ab5eda.tar.gz"

PACKAGES=(autoconf automake libtool m4 libhwloc-dev libedit-dev libical-dev swig
    libcjson-dev libncurses-dev libexpat1-dev tcl-dev tk-dev libx11-dev libxt-dev
    libxext-dev libxft-dev libpq-dev postgresql python3-dev libssl-dev
    build-essential pkg-config patch curl ca-certificates)

# OpenPBS refuses loopback addresses ("Could not find any usable IP address",
# openpbs issues 2570 and 2492); the test hosts are 127.0.0.10-14. Drop the check.
LOOPBACK_PATCH=$(
    cat <<'EOF'
--- a/src/lib/Libnet/hnls.c
+++ b/src/lib/Libnet/hnls.c
@@ -518,8 +518,6 @@
 		if (aip->ai_family == AF_INET) { /* for now only count IPv4 addresses */
 			char *p;
 			struct sockaddr_in *sa = (struct sockaddr_in *) aip->ai_addr;
-			if (ntohl(sa->sin_addr.s_addr) >> 24 == IN_LOOPBACKNET)
-				continue;
 			sprintf(buf, "%s", netaddr(sa));
 			if (!strcmp(buf, "unknown"))
 				continue;
--- a/src/lib/Libtpp/tpp_platform.c
+++ b/src/lib/Libtpp/tpp_platform.c
@@ -776,8 +776,6 @@
 		if (aip->ai_family == AF_INET) { /* for now only work with IPv4 */
 			if (aip->ai_family == AF_INET) {
 				struct sockaddr_in *sa = (struct sockaddr_in *) aip->ai_addr;
-				if (ntohl(sa->sin_addr.s_addr) >> 24 == IN_LOOPBACKNET)
-					continue;
 				memcpy(&ips[i].ip, &sa->sin_addr, sizeof(sa->sin_addr));
 			} else if (aip->ai_family == AF_INET6) {
 				struct sockaddr_in6 *sa6 = (struct sockaddr_in6 *) aip->ai_addr;
EOF
)
PATCH_SHA256=$(printf '%s\n' "$LOOPBACK_PATCH" | sha256sum | cut -d' ' -f1)
WANTED_STAMP="openpbs-source-sha256 $SOURCE_SHA256
loopback-patch-sha256 $PATCH_SHA256"

log() { echo "install-openpbs.sh: $*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

up_to_date() {
    [[ -x $PREFIX/bin/qsub && -x $PREFIX/sbin/pbs_server && -x $PREFIX/sbin/pbs_mom ]] &&
        [[ -f $STAMP && "$(cat "$STAMP")" == "$WANTED_STAMP" ]]
}

if [[ ${1:-} == --check ]]; then
    up_to_date
    exit
fi
[[ $# -eq 0 ]] || die "usage: $0 [--check]"

if up_to_date; then
    log "OpenPBS in $PREFIX is up to date ($STAMP)"
    exit 0
fi
[[ $(id -u) -eq 0 ]] || die "need root to build and install OpenPBS into $PREFIX"

START=$SECONDS
phase_start=$SECONDS
phase() { # print the time of the phase that just ended
    log "$1: $((SECONDS - phase_start)) s"
    phase_start=$SECONDS
}

# Digest of the files of an unpacked source tree (paths relative to the tree, file
# contents, symlink targets), independent of the top folder's name.
tree_digest() {
    (
        cd "$1"
        {
            find . -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum
            find . -type l -printf '%p -> %l\n' | LC_ALL=C sort
        } | sha256sum | cut -d' ' -f1
    )
}

# ---------------------------------------------------------------- build deps
export DEBIAN_FRONTEND=noninteractive
missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    [[ $status == installed ]] || missing+=("$pkg")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    log "installing ${missing[*]}"
    apt_install() {
        apt-get install -y -q --no-install-recommends \
            -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
            "${missing[@]}"
    }
    # Without refreshing the package lists first (fast when they are fresh);
    # refresh them only if that fails (fresh machine: empty or stale lists).
    if ! apt_install; then
        apt-get update -q
        apt_install
    fi
fi
phase "build dependencies"

# ---------------------------------------------------------------- source
mkdir -p "$BUILD_DIR"
if [[ -n ${OPENPBS_TARBALL:-} ]]; then
    tarball=$OPENPBS_TARBALL
    [[ -f $tarball ]] || die "OPENPBS_TARBALL=$tarball: no such file"
elif [[ -f $VENDOR_TARBALL ]]; then
    tarball=$VENDOR_TARBALL
else
    tarball="$BUILD_DIR/openpbs-$OPENPBS_COMMIT.tar.gz"
    if [[ ! -f $tarball ]]; then
        log "downloading $SOURCE_URL"
        curl -fL --retry 3 -o "$tarball.part" "$SOURCE_URL"
        mv -f "$tarball.part" "$tarball"
    fi
fi
log "source: $tarball"
commit=$(gzip -dc "$tarball" | git get-tar-commit-id 2>/dev/null || true)
if [[ -n $commit && $commit != "$OPENPBS_COMMIT" ]]; then
    die "$tarball is commit $commit, not $OPENPBS_COMMIT"
fi
tarball_sha256=$(sha256sum "$tarball" | cut -d' ' -f1)

SRC="$BUILD_DIR/src"
rm -rf "$SRC"
mkdir -p "$SRC"
tar -xzf "$tarball" -C "$SRC" --strip-components=1 --no-same-owner
if [[ $tarball_sha256 == "$SOURCE_SHA256" ]]; then
    log "sha256 $tarball_sha256 (pinned)"
else
    digest=$(tree_digest "$SRC")
    if [[ $digest != "$SOURCE_TREE_SHA256" ]]; then
        rm -rf "$SRC"
        die "$tarball: sha256 $tarball_sha256 and file digest $digest match neither" \
            "the pinned sha256 $SOURCE_SHA256 nor the pinned file digest $SOURCE_TREE_SHA256"
    fi
    log "sha256 $tarball_sha256 differs from the pinned tarball, but its files are the same"
fi
phase "unpack"

cd "$SRC"
if ! printf '%s\n' "$LOOPBACK_PATCH" | patch -p1 --forward --dry-run >/dev/null; then
    printf '%s\n' "$LOOPBACK_PATCH" | patch -p1 --forward --dry-run || true
    die "the loopback patch does not apply to $tarball"
fi
printf '%s\n' "$LOOPBACK_PATCH" | patch -p1 --forward
if grep -n 'IN_LOOPBACKNET)$' src/lib/Libnet/hnls.c src/lib/Libtpp/tpp_platform.c; then
    die "loopback checks still present after patching"
fi

# ---------------------------------------------------------------- build, install
./autogen.sh >"$BUILD_DIR/autogen.log" 2>&1 || {
    tail -n 40 "$BUILD_DIR/autogen.log" >&2
    die "autogen.sh failed (log: $BUILD_DIR/autogen.log)"
}
./configure --prefix="$PREFIX" >"$BUILD_DIR/configure.log" 2>&1 || {
    tail -n 40 "$BUILD_DIR/configure.log" >&2
    die "configure failed (log: $BUILD_DIR/configure.log)"
}
phase "autogen + configure"
make -j"$(nproc)" >"$BUILD_DIR/make.log" 2>&1 || {
    tail -n 60 "$BUILD_DIR/make.log" >&2
    die "make failed (log: $BUILD_DIR/make.log)"
}
phase "make -j$(nproc)"
rm -f "$STAMP" # an interrupted install must not look finished
make install >"$BUILD_DIR/install.log" 2>&1 || {
    tail -n 40 "$BUILD_DIR/install.log" >&2
    die "make install failed (log: $BUILD_DIR/install.log)"
}
PBS_EXEC=$PREFIX "$PREFIX/libexec/pbs_postinstall" server >"$BUILD_DIR/postinstall.log" 2>&1 || {
    tail -n 40 "$BUILD_DIR/postinstall.log" >&2
    die "pbs_postinstall failed (log: $BUILD_DIR/postinstall.log)"
}
chmod 4755 "$PREFIX/sbin/pbs_iff" "$PREFIX/sbin/pbs_rcp"
phase "make install + pbs_postinstall"

printf '%s\n' "$WANTED_STAMP" >"$STAMP"
up_to_date || die "installed, but $PREFIX does not look complete"
log "OpenPBS installed in $PREFIX in $((SECONDS - START)) s (build folder $BUILD_DIR)"
