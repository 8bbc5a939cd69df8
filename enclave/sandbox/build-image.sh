#!/usr/bin/env bash
# Build the sandbox root filesystem without any container registry.
#
# debootstrap installs a minimal Debian bookworm with the interpreters the
# sandbox needs, from the Debian mirror this machine's apt already uses. The
# result is imported as a Docker image (for the docker backend) and/or left in
# a directory (for the local bubblewrap backend). Both carry a recipe hash, so
# running the script again with an unchanged recipe does nothing.
#
# Usage:
#   build-image.sh                      build the image enclave-sandbox:latest
#   build-image.sh --image NAME:TAG     build the image under another name
#   build-image.sh --rootfs DIR         only leave the root filesystem in DIR
#   build-image.sh --rootfs DIR --image NAME:TAG    both, from one bootstrap
#   build-image.sh --force              rebuild even when the recipe is current
#   build-image.sh --print-mirror       print the Debian mirror it would use, and exit
#
# Environment:
#   ENCLAVE_DEBIAN_MIRROR   the Debian archive URL to bootstrap from; by default
#                           the one in /etc/apt/sources.list(.d)
#   ENCLAVE_BUILD_TMPDIR    where the temporary root filesystem is assembled
#                           (default /var/tmp; needs room for ~400 MB)

set -euo pipefail

readonly SUITE="bookworm"
# Keep this list in step with the Dockerfile beside this script.
readonly PACKAGES="python3,python3-venv,nodejs,git,ca-certificates"
readonly SANDBOX_USER="sandbox"
readonly SANDBOX_UID=1000
readonly WORKDIR="/workspace"
readonly RECIPE_LABEL="org.enclave.sandbox.recipe"
readonly RECIPE_STAMP="etc/enclave-sandbox-recipe"
# Programs from beside this script that run inside sandboxes, installed where
# the kubernetes backend runs them (the other backends mount the same files
# at the same place). Keep this list in step with the Dockerfile.
readonly SOURCE_DIR="$(cd "$(dirname "$0")" && pwd)"
readonly PROGRAM_DIR="/opt/enclave/sandbox"
readonly SANDBOX_PROGRAMS=(launcher.py clone_step.py git_askpass.py relay.py node-proxy.js)

image=""
rootfs=""
force=0
work=""

log() {
    printf 'build-image: %s\n' "$*" >&2
}

die() {
    log "error: $*"
    exit 1
}

usage() {
    sed -n '/^# Usage:/,/^$/p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit "${1:-0}"
}

parse_args() {
    while (($#)); do
        case "$1" in
            --image)
                (($# >= 2)) || die "--image needs a NAME:TAG"
                image="$2"
                shift 2
                ;;
            --rootfs)
                (($# >= 2)) || die "--rootfs needs a directory"
                rootfs="$2"
                shift 2
                ;;
            --force)
                force=1
                shift
                ;;
            --print-mirror)
                choose_mirror
                exit 0
                ;;
            -h | --help)
                usage 0
                ;;
            *)
                log "unknown argument: $1"
                usage 2
                ;;
        esac
    done
    # With no target at all, the image under its usual name is what people want.
    if [[ -z "$image" && -z "$rootfs" ]]; then
        image="enclave-sandbox:latest"
    fi
}

recipe_hash() {
    # The script holds the whole recipe; the package list is hashed as well so
    # that the hash names what was installed even if it moves out one day.
    { cat "$0"; printf '%s\n' "$SUITE" "$PACKAGES"; (cd "$SOURCE_DIR" && cat "${SANDBOX_PROGRAMS[@]}"); } |
        sha256sum | cut -c1-64
}

# Print the first archive URI from apt's configuration that serves $SUITE, or,
# failing that, the first one whose path is a Debian archive root.
mirror_from_apt() {
    local files=() f
    [[ -f /etc/apt/sources.list ]] && files+=(/etc/apt/sources.list)
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] && files+=("$f")
    done
    ((${#files[@]})) || return 1

    awk -v suite="$SUITE" '
        function flush() {
            if (types ~ /(^|[ \t])deb([ \t]|$)/ && uris != "") {
                n = split(uris, list, /[ \t]+/)
                for (i = 1; i <= n; i++) {
                    if (list[i] == "") continue
                    if (suites ~ ("(^|[ \t])" suite "([ \t]|$)") && exact == "") exact = list[i]
                    if (list[i] ~ /\/debian\/?$/ && fallback == "") fallback = list[i]
                }
            }
            types = ""; uris = ""; suites = ""
        }
        # deb822 stanzas (*.sources): fields until a blank line.
        FILENAME ~ /\.sources$/ {
            if (FNR == 1) flush()
            if ($0 ~ /^[ \t]*$/) { flush(); next }
            if ($0 ~ /^[ \t]*#/) next
            if (tolower($1) == "types:") { sub(/^[^:]*:[ \t]*/, ""); types = $0 }
            else if (tolower($1) == "uris:") { sub(/^[^:]*:[ \t]*/, ""); uris = $0 }
            else if (tolower($1) == "suites:") { sub(/^[^:]*:[ \t]*/, ""); suites = $0 }
            next
        }
        # One-line format: deb [options] URI SUITE COMPONENT...
        {
            flush()
            if ($1 != "deb") next
            field = 2
            if ($field ~ /^\[/) { while (field <= NF && $field !~ /\]$/) field++; field++ }
            types = "deb"; uris = $field; suites = $(field + 1)
            flush()
        }
        END {
            flush()
            if (exact != "") print exact
            else if (fallback != "") print fallback
            else exit 1
        }
    ' "${files[@]}"
}

choose_mirror() {
    if [[ -n "${ENCLAVE_DEBIAN_MIRROR:-}" ]]; then
        printf '%s\n' "$ENCLAVE_DEBIAN_MIRROR"
        return
    fi
    mirror_from_apt || die "no Debian mirror found in /etc/apt/sources.list or \
/etc/apt/sources.list.d/; set ENCLAVE_DEBIAN_MIRROR to a Debian archive URL"
}

image_is_current() {
    local found
    found="$(docker image inspect --format "{{ index .Config.Labels \"$RECIPE_LABEL\" }}" \
        "$image" 2>/dev/null)" || return 1
    [[ "$found" == "$1" ]]
}

rootfs_is_current() {
    [[ -f "$rootfs/$RECIPE_STAMP" ]] && [[ "$(cat "$rootfs/$RECIPE_STAMP")" == "$1" ]]
}

# debootstrap mounts /proc and /sys inside the target; after a failure they can
# stay behind, and removing the tree under a live mount would be a disaster.
release_work_dir() {
    [[ -n "$work" && -d "$work" ]] || return 0
    local target
    findmnt --list --noheadings --output TARGET |
        awk -v prefix="$work/" 'index($0, prefix) == 1' | sort -r |
        while read -r target; do
            umount --lazy "$target" || log "could not unmount $target"
        done
    rm -rf --one-file-system "$work"
}

bootstrap() {
    local target="$1" mirror="$2" recipe="$3"

    log "debootstrap $SUITE (minbase) from $mirror into $target"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$target" "$mirror" \
        >"$target.log" 2>&1 || {
        tail -n 30 "$target.log" >&2
        die "debootstrap failed; the full log is $target.log"
    }
    rm -f "$target.log"

    log "adding user $SANDBOX_USER ($SANDBOX_UID:$SANDBOX_UID) and $WORKDIR"
    groupadd --root "$target" --gid "$SANDBOX_UID" "$SANDBOX_USER"
    useradd --root "$target" --uid "$SANDBOX_UID" --gid "$SANDBOX_UID" \
        --home-dir "/home/$SANDBOX_USER" --create-home --shell /bin/bash "$SANDBOX_USER"
    install -d -m 0755 -o "$SANDBOX_UID" -g "$SANDBOX_UID" "$target$WORKDIR"
    install -d -m 0755 "$target$PROGRAM_DIR"
    (cd "$SOURCE_DIR" && install -m 0755 "${SANDBOX_PROGRAMS[@]}" "$target$PROGRAM_DIR/")

    # Nothing of the build host belongs in the sandbox: its resolver and name
    # are replaced at run time anyway, and package caches only add weight.
    rm -f "$target/etc/resolv.conf" "$target/etc/hostname"
    : >"$target/etc/resolv.conf"
    printf 'sandbox\n' >"$target/etc/hostname"
    rm -rf "$target"/var/cache/apt/archives/*.deb "$target"/var/lib/apt/lists/*
    rm -rf "$target"/var/log/* "$target/debootstrap" 2>/dev/null || true

    chroot "$target" python3 -c 'import asyncio, json, ssl, venv' ||
        die "python3 in the new root filesystem lacks part of its standard library"
    chroot "$target" node --version >/dev/null || die "node does not run in the new root filesystem"

    printf '%s\n' "$recipe" >"$target/$RECIPE_STAMP"
}

import_image() {
    local source="$1" recipe="$2" previous

    previous="$(docker image inspect --format '{{ .Id }}' "$image" 2>/dev/null || true)"
    log "importing $source as $image"
    tar --numeric-owner --xattrs -C "$source" \
        --exclude='./proc/*' --exclude='./sys/*' --exclude='./dev/*' -c . |
        docker import \
            --change "USER $SANDBOX_USER" \
            --change "WORKDIR $WORKDIR" \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV LANG=C.UTF-8' \
            --change "LABEL $RECIPE_LABEL=$recipe" \
            --change 'CMD ["python3"]' \
            --message "enclave sandbox, recipe $recipe" \
            - "$image" >/dev/null

    # The image the tag used to name is now unnamed; drop it unless something
    # still uses it (a running sandbox, another tag).
    if [[ -n "$previous" && "$previous" != "$(docker image inspect --format '{{ .Id }}' "$image")" ]]; then
        docker image rm "$previous" >/dev/null 2>&1 ||
            log "kept the previous image ${previous:7:12}: it is still in use"
    fi
}

install_rootfs() {
    local source="$1"

    if [[ -e "$rootfs" ]]; then
        log "replacing the outdated root filesystem in $rootfs"
        rm -rf --one-file-system "$rootfs"
    fi
    mv "$source" "$rootfs"
    log "root filesystem ready in $rootfs"
}

main() {
    parse_args "$@"
    [[ "$(id -u)" -eq 0 ]] || die "debootstrap needs root; run this script as root"
    command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
    local program
    for program in "${SANDBOX_PROGRAMS[@]}"; do
        [[ -f "$SOURCE_DIR/$program" ]] || die "$SOURCE_DIR/$program is missing"
    done
    if [[ -n "$image" ]]; then
        command -v docker >/dev/null || die "the docker CLI is not installed"
        docker info >/dev/null 2>&1 || die "the Docker engine is not reachable (is dockerd running?)"
    fi

    local recipe need_image=0 need_rootfs=0
    recipe="$(recipe_hash)"
    if [[ -n "$image" ]]; then
        if ((force)) || ! image_is_current "$recipe"; then
            need_image=1
        else
            log "$image already holds recipe ${recipe:0:12}; nothing to do"
        fi
    fi
    if [[ -n "$rootfs" ]]; then
        rootfs="$(realpath -m "$rootfs")"
        if ((force)) || ! rootfs_is_current "$recipe"; then
            need_rootfs=1
        else
            log "$rootfs already holds recipe ${recipe:0:12}; nothing to do"
        fi
    fi
    ((need_image || need_rootfs)) || return 0

    # Only one build at a time: two at once would fight over the same outputs.
    exec 9>/var/lock/enclave-sandbox-build.lock
    flock 9

    local mirror started=$SECONDS parent
    mirror="$(choose_mirror)"
    # Assemble next to the destination so the final move is a rename.
    if ((need_rootfs)); then
        parent="$(dirname "$rootfs")"
        mkdir -p "$parent"
    else
        parent="${ENCLAVE_BUILD_TMPDIR:-/var/tmp}"
    fi
    work="$(mktemp -d "$parent/.enclave-rootfs.XXXXXX")"
    trap release_work_dir EXIT
    chmod 0755 "$work"

    bootstrap "$work" "$mirror" "$recipe"
    if ((need_image)); then
        import_image "$work" "$recipe"
    fi
    if ((need_rootfs)); then
        install_rootfs "$work"
        work=""
    fi
    log "done in $((SECONDS - started)) s (recipe ${recipe:0:12})"
}

main "$@"
