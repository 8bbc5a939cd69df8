#!/usr/bin/env bash
# Build the control plane the Kubernetes backend tests run against, from
# Debian bookworm's packages alone:
#   kube-apiserver, kube-controller-manager  built from the `kubernetes` source
#                                           package (upstream 1.20.2 with vendor/)
#   kubectl                                  from the `kubernetes-client` package
#   etcd                                     from the `etcd-server` package
# Everything lands outside the clone (default /var/lib/enclave/k8s/bin), so a
# machine builds once and later runs only check what is there.
#
# Usage: tests/k8s/build-kubernetes.sh [--prefix DIR] [--force]
#
# Needs (installed by .ci/run): golang-go, rsync, make, openssl and
# golang-github-modern-go-reflect2-dev. A cold build takes ten to fifteen
# minutes on two cores.
set -euo pipefail

readonly K8S_SOURCE_VERSION=1.20.5+really1.20.2-1.1+deb12u1
readonly K8S_UPSTREAM_DIR=kubernetes-1.20.2
readonly K8S_GIT_VERSION=v1.20.2
readonly K8S_GIT_COMMIT=faecb196815e248d3ecfb03c680a4507229c2a56
readonly REFLECT2_SRC=/usr/share/gocode/src/github.com/modern-go/reflect2
# The mirror this machine's apt already uses (or ENCLAVE_DEBIAN_MIRROR), found
# the same way the sandbox image's build finds it.
DEBIAN_MIRROR=$(bash "$(dirname "$0")/../../enclave/sandbox/build-image.sh" --print-mirror)
readonly DEBIAN_MIRROR

prefix=/var/lib/enclave/k8s
force=false
while [ $# -gt 0 ]; do
  case "$1" in
  --prefix)
    prefix=${2:?--prefix needs a directory}
    shift 2
    ;;
  --force)
    force=true
    shift
    ;;
  *)
    printf 'usage: %s [--prefix DIR] [--force]\n' "$0" >&2
    exit 2
    ;;
  esac
done

readonly bin=$prefix/bin
readonly work=$prefix/build

say() {
  printf 'build-kubernetes: %s\n' "$*" >&2
}

die() {
  say "$*"
  exit 1
}

# Debian's mirrors now and then drop a connection; downloads get a second try.
retry() {
  local attempt
  for attempt in 1 2 3; do
    "$@" && return 0
    say "attempt $attempt of '$*' failed"
    sleep $((attempt * 5))
  done
  return 1
}

server_built() {
  [ -x "$bin/kube-apiserver" ] && [ -x "$bin/kube-controller-manager" ] || return 1
  # Read the whole output first: with pipefail, a reader that stops early
  # (grep -q, head) can fail the pipeline through SIGPIPE.
  local version
  version=$("$bin/kube-apiserver" --version 2>/dev/null) || return 1
  [ "$version" = "Kubernetes $K8S_GIT_VERSION" ]
}

# Unpack one Debian binary package and install one program from it. dpkg -x
# runs no maintainer scripts, so no service is installed or started.
install_from_deb() {
  local package=$1 program=$2 deb
  mkdir -p "$work/debs"
  (cd "$work/debs" && retry apt-get -q download "$package")
  deb=$(find "$work/debs" -maxdepth 1 -name "${package}_*.deb" | sort | tail -n 1)
  [ -n "$deb" ] || die "apt-get download $package brought no package"
  rm -rf "$work/unpacked-$package"
  dpkg -x "$deb" "$work/unpacked-$package"
  install -m 0755 "$work/unpacked-$package/usr/bin/$program" "$bin/$program"
}

build_server() {
  for tool in go rsync make apt-get tar; do
    command -v "$tool" >/dev/null || die "'$tool' is missing (see the header of $0)"
  done
  [ -d "$REFLECT2_SRC" ] ||
    die "$REFLECT2_SRC is missing: install golang-github-modern-go-reflect2-dev"

  # apt-get source needs deb-src entries; a private apt state keeps the
  # machine's own sources and package lists untouched.
  mkdir -p "$work/apt/lists/partial" "$work/apt/cache/archives/partial" "$work/src"
  printf 'deb-src %s bookworm main\ndeb-src %s-security bookworm-security main\n' \
    "$DEBIAN_MIRROR" "$DEBIAN_MIRROR" >"$work/apt/sources.list"
  local apt_private=(
    -o "Dir::Etc::SourceList=$work/apt/sources.list"
    -o "Dir::Etc::SourceParts=/nonexistent"
    -o "Dir::State::Lists=$work/apt/lists"
    -o "Dir::Cache=$work/apt/cache"
  )
  retry apt-get "${apt_private[@]}" -q update
  (cd "$work/src" && retry apt-get "${apt_private[@]}" -q source --download-only \
    "kubernetes=$K8S_SOURCE_VERSION")
  local orig tree vendored
  orig=$(find "$work/src" -maxdepth 1 -name 'kubernetes_*.orig.tar.gz' | head -n 1)
  [ -n "$orig" ] || die "the source package brought no upstream tarball"

  # The upstream tarball is the whole 1.20.2 tree with vendor/. Debian's own
  # patches serve its packaging build against system Go libraries, which this
  # build does not use, so only the tarball is unpacked.
  tree=$work/src/$K8S_UPSTREAM_DIR
  rm -rf "$tree"
  tar -xzf "$orig" -C "$work/src"
  [ -d "$tree/vendor" ] || die "$tree has no vendor directory"

  # The vendored reflect2 1.0.1 crashes on Go 1.18 and newer; Debian ships the
  # fixed 1.0.2 as a Go source package.
  vendored=$tree/vendor/github.com/modern-go/reflect2
  rm -f "$vendored"/*.go "$vendored"/*.s
  cp "$REFLECT2_SRC"/*.go "$REFLECT2_SRC"/*.s "$vendored"/

  # The tarball carries no .git, so the version stamp is given here.
  (
    export GOCACHE=$work/gocache GOPATH=$work/gopath HOME=$work/home
    export CGO_ENABLED=0 KUBE_GIT_VERSION=$K8S_GIT_VERSION KUBE_GIT_TREE_STATE=clean
    export KUBE_GIT_COMMIT=$K8S_GIT_COMMIT KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20
    mkdir -p "$HOME"
    cd "$tree"
    make WHAT="cmd/kube-apiserver cmd/kube-controller-manager"
  )
  install -m 0755 "$tree/_output/bin/kube-apiserver" \
    "$tree/_output/bin/kube-controller-manager" "$bin/"
  # The tree and the Go build cache are over 2 GB and serve no later run.
  rm -rf "$tree" "$work/gocache" "$work/gopath"
}

mkdir -p "$bin" "$work"
if [ "$force" = true ] || ! server_built; then
  say "building kube-apiserver and kube-controller-manager $K8S_GIT_VERSION"
  build_server
  server_built || die "the binaries in $bin do not report $K8S_GIT_VERSION"
fi
if [ "$force" = true ] || [ ! -x "$bin/etcd" ]; then
  install_from_deb etcd-server etcd
fi
if [ "$force" = true ] || [ ! -x "$bin/kubectl" ]; then
  install_from_deb kubernetes-client kubectl
fi

"$bin/kube-apiserver" --version
"$bin/etcd" --version | sed -n 1p
"$bin/kubectl" version --client --short 2>/dev/null || "$bin/kubectl" version --client
say "ready in $bin"
