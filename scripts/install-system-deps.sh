#!/usr/bin/env bash
# Install the Debian packages remote-cli needs, only those missing (fast when all are present).
#   scripts/install-system-deps.sh run    what `make up` needs
#   scripts/install-system-deps.sh test   plus what the tests and benchmarks drive
set -euo pipefail

# nodejs and npm bring noVNC (and the optional provider CLIs) with `npm ci`.
# A local session: Xvnc (tigervnc-standalone-server), the window manager, xterm, tmux, and the
# system's python3 for its tty server; DejaVu Sans Mono, with Symbola and Noto Color Emoji as
# fontconfig's fallback for symbols and emoji.
# passt (pasta), nftables and libseccomp2 make the local sandbox's network and system-call filter.
run_packages=(tigervnc-standalone-server matchbox-window-manager xterm tmux python3 bubblewrap
  passt nftables libseccomp2 procps fonts-dejavu-core fonts-symbola fonts-noto-color-emoji
  nodejs npm)
# xvfb and x11vnc: the benchmarks' peer display pair (`make bench`), no longer what sessions run.
# postgresql: the store's tests also run on PostgreSQL, in a throwaway cluster of their own
# (tests/postgres.py uses its binaries in /usr/lib/postgresql/*/bin, not the system's cluster).
test_packages=(nginx-light chromium qemu-system-x86 qemu-utils debootstrap e2fsprogs
  busybox-static cpio zstd iproute2 xvfb x11vnc postgresql)

case "${1:-run}" in
  run) wanted=("${run_packages[@]}") ;;
  test) wanted=("${run_packages[@]}" "${test_packages[@]}") ;;
  *) echo "usage: $0 run|test" >&2; exit 2 ;;
esac

missing=()
for package in "${wanted[@]}"; do
  if [[ $package == nodejs || $package == npm ]] && command -v "${package/nodejs/node}" >/dev/null; then
    continue  # a Node.js from elsewhere (for example NodeSource) serves as well
  fi
  status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
  [[ $status == "install ok installed" ]] || missing+=("$package")
done

# pasta opens /dev/net/tun from inside the session's user namespace: it needs Debian's default
# mode 0666 (some containers create the node 0600). Only root may change it.
tun_mode() {
  if [[ -c /dev/net/tun && $(stat -c %a /dev/net/tun) != 666 && $(id -u) -eq 0 ]]; then
    chmod 0666 /dev/net/tun
  fi
}

if [[ ${#missing[@]} -eq 0 ]]; then
  tun_mode
  exit 0
fi

echo "Installing Debian packages: ${missing[*]}"
sudo=()
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "error: run as root or install sudo to install: ${missing[*]}" >&2; exit 1; }
  sudo=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
tun_mode
