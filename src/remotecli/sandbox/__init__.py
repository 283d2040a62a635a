"""The local driver's sandbox: what keeps a session from the host, the other sessions and us.

One module per mechanism, each small enough to read in one screen:

- ``launch``: the stdlib-only launcher run as root between the controller and bubblewrap
  (private mount staging, cgroup join, rlimits, new session, closing every inherited descriptor,
  dropping to the session's own host uid);
- ``seccomp``: the system-call filter bubblewrap installs (``--seccomp FD``);
- ``uids``: one unprivileged host uid per live session, allocated host-wide;
- ``cgroups``: memory, process and CPU limits on cgroup v1 or v2, and out-of-memory detection;
- ``network``: the session's own network namespace, user-mode egress through ``pasta`` and the
  host firewall rule that keeps that egress off the host and private ranges.
"""

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""The PATH of every program the sandbox starts (the session, pasta): system directories only."""
