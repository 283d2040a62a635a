"""Session drivers: each starts and stops one session's sandbox and says where its VNC server is.

``local`` (Xvnc + tmux + xterm under bubblewrap) is the embedded default; ``qemu`` runs each
session in a microVM; ``cluster`` places each session on a host of a Ray cluster, which runs
it with its own local driver. The names are :data:`remotecli.config.DRIVER_NAMES`;
:func:`create_driver` is the one place that maps a name to a driver and hands it its settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from remotecli.config import DRIVER_NAMES, ControllerConfig
from remotecli.drivers.base import Driver, ProgressCallback, SessionSpec, VncEndpoint
from remotecli.exceptions import ConfigError

if TYPE_CHECKING:
    from remotecli.sandbox.cgroups import Limits

__all__ = [
    "DRIVER_NAMES",
    "Driver",
    "ProgressCallback",
    "SessionSpec",
    "VncEndpoint",
    "create_driver",
]


def session_limits(config: ControllerConfig) -> Limits:
    """What one session may use, from the controller's ``session_*`` settings."""
    from remotecli.sandbox.cgroups import Limits

    return Limits(
        memory_bytes=config.session_memory,
        pids=config.session_processes,
        cpus=config.session_cpus,
        home_bytes=config.session_home_size,
    )


def create_driver(name: str, data_dir: Path, config: ControllerConfig | None = None) -> Driver:
    """Return the driver called ``name``, keeping its state under ``data_dir``.

    ``config`` carries the driver's own settings (the local sandbox's limits, the sessions'
    egress, the microVMs' memory, accelerator and warm pool); without it each driver takes its
    defaults.
    """
    if name == "local":
        from remotecli.drivers.local import LocalDriver

        if config is None:
            return LocalDriver(data_dir)
        return LocalDriver(data_dir, limits=session_limits(config), egress=config.egress)
    if name == "qemu":
        from remotecli.drivers.qemu import QemuDriver

        if config is None:
            return QemuDriver(data_dir)
        return QemuDriver(
            data_dir,
            memory_mib=config.qemu_memory // 1024**2,
            accelerator=None if config.qemu_accelerator == "auto" else config.qemu_accelerator,
            pool_size=config.qemu_pool_size,
            egress=config.egress,
            tcg_cache_mib=max(1, config.qemu_tcg_cache // 1024**2),
        )
    if name == "cluster":
        if config is None or not config.cluster_address or config.cluster_token_file is None:
            raise ConfigError(
                "driver cluster needs cluster_address (HEAD:6379) and cluster_token_file "
                "(the head's token file); see docs/cluster.md",
                driver=name,
            )
        if config.cluster_tls_dir is not None:
            from remotecli.cluster.ray_tls import export_tls

            export_tls(config.cluster_tls_dir)  # before Ray is imported: it reads them once
        from remotecli.cluster.driver import ClusterDriver

        return ClusterDriver(
            config.cluster_address,
            config.cluster_token_file,
            channel_tls=config.cluster_channel_tls,
            limits=session_limits(config),
            host_driver=config.cluster_host_driver,
            tls_dir=config.cluster_tls_dir,
            egress=config.egress,
            qemu_memory_mib=config.qemu_memory // 1024**2,
        )
    raise ConfigError(
        f"unknown driver {name!r}; choose one of: {', '.join(DRIVER_NAMES)}", driver=name
    )
