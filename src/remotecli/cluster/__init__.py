"""Sessions placed across many hosts by Ray: the hosts' Ray nodes, the session actor, the
controller's side (placement, finding actors again, the failure watcher). Only used when a
cluster is configured; ``remotecli up`` on one host never imports Ray."""
