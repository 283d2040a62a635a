"""What a session's terminal is, the same in a local sandbox and in a microVM guest.

Imported by the local driver (``drivers/local_sandbox.py``) and the guest image builder
(``images/rootfs.py``), which may not import each other.
"""

from __future__ import annotations

TMUX_CONF = """\
# remote-cli: the session's tmux, bound read-only into the sandbox.
# The CLI runs in tmux's one session "main"; the desktop's xterm and each text view attach to it.
set -g default-terminal "tmux-256color"
set -as terminal-features ",*:RGB"
set -as terminal-overrides ",*:Tc"
# The window takes the size of the client that was used last, so the desktop and a text view of
# another size do not fight: the one being typed into (or resized) wins.
set -g window-size latest
set -g aggressive-resize on
set -g status off
set -g prefix None
set -g prefix2 None
set -s escape-time 10
set -g history-limit 10000
set -g focus-events on
set -g set-titles off
"""
"""tmux's configuration: the CLI in session ``main``, the desktop's xterm and each text view
attached to it, the window at the size of the client used last."""
