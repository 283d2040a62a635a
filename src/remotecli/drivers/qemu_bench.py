"""The qemu driver with what only benchmarks and tests use: cold boots, full restores, PIDs.

The controller never builds this class (``create_driver`` makes a plain
:class:`~remotecli.drivers.qemu.QemuDriver`); ``bench/qemu.py`` compares the ways a session can
start with it, and the end-to-end tests look at a session's QEMU process and serial console.
"""

from __future__ import annotations

from pathlib import Path

from remotecli.drivers.base import ProgressCallback, SessionSpec, VncEndpoint
from remotecli.drivers.qemu import COLD_BOOT_SECONDS, QemuDriver
from remotecli.drivers.qemu_guest import control_exchange
from remotecli.drivers.qemu_machine import (
    GUEST_RELAY_PORT,
    GUEST_TTY_PORT,
    GUEST_VNC_PORT,
    Machine,
)
from remotecli.drivers.qemu_vm import host_port, load_state, restore, save_state, terminate


class QemuBenchDriver(QemuDriver):
    """A :class:`QemuDriver` that can also start sessions the slow ways, for comparison."""

    async def start_cold(self, spec: SessionSpec, progress: ProgressCallback) -> VncEndpoint:
        """Boot one session from scratch, without a template (for comparison in benchmarks)."""
        machine = await self.machine_for(spec, progress)
        spec.workdir.mkdir(parents=True, exist_ok=True)
        memory = spec.workdir / "memory"
        vm = await self._spawn(spec.session_id, machine, spec.workdir, memory, template=True)
        try:
            await control_exchange(vm.paths.control, b"", "ready", within=COLD_BOOT_SECONDS)
            await self._personalise(vm, spec.session_id)
        except BaseException:
            await terminate(vm)
            raise
        finally:
            memory.unlink(missing_ok=True)  # the mapping stays alive; the name is not needed
        self._vms[spec.session_id] = vm
        return VncEndpoint(host="127.0.0.1", port=vm.port, password=vm.password)

    async def save_full_snapshot(self, session_id: str, snapshot: Path) -> None:
        """Save a running session's device state *and* all its RAM into ``snapshot``.

        For the benchmark's "full restore" path; the session keeps running afterwards.
        """
        vm = self._vms[session_id]
        assert vm.qmp is not None
        await vm.qmp.execute("stop")
        await vm.qmp.execute(
            "migrate-set-capabilities",
            capabilities=[{"capability": "x-ignore-shared", "state": False}],
        )
        await save_state(vm.qmp, snapshot)
        await vm.qmp.execute("cont")

    async def start_full_restore(
        self, spec: SessionSpec, machine: Machine, snapshot: Path, progress: ProgressCallback
    ) -> VncEndpoint:
        """Start a session by loading every RAM page from ``snapshot`` (no shared RAM file)."""
        spec.workdir.mkdir(parents=True, exist_ok=True)
        vm = await self._spawn(spec.session_id, machine, spec.workdir, None, template=False)
        try:
            assert vm.qmp is not None
            await vm.qmp.execute(
                "migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}]
            )
            await load_state(vm.qmp, snapshot)
            await vm.qmp.execute("cont")
            await self._personalise(vm, spec.session_id)
            progress("full restore done; VNC banner read")
        except BaseException:
            await terminate(vm)
            raise
        self._vms[spec.session_id] = vm
        return VncEndpoint(host="127.0.0.1", port=vm.port, password=vm.password)

    async def restore_only(self, spec: SessionSpec, progress: ProgressCallback) -> dict[int, int]:
        """Restore a clone and stop there, before it gets its own password and secret (for
        tests of that window); return its forwarded ports by guest port. Stop it as a session.
        """
        machine = await self.machine_for(spec, progress)
        template = await self.ensure_template(machine, progress)
        spec.workdir.mkdir(parents=True, exist_ok=True)
        vm = await self._spawn(
            spec.session_id, machine, spec.workdir, template / "memory", template=False
        )
        self._vms[spec.session_id] = vm
        await restore(vm, template)
        return {
            guest: await host_port(vm, guest)
            for guest in (GUEST_VNC_PORT, GUEST_TTY_PORT, GUEST_RELAY_PORT)
        }

    def pid_of(self, session_id: str) -> int | None:
        """The QEMU process id of a running session (for tests and benchmarks)."""
        vm = self._vms.get(session_id)
        return vm.pid if vm is not None else None

    def serial_log(self, session_id: str) -> Path | None:
        """The file the session's serial console is captured to."""
        vm = self._vms.get(session_id)
        return vm.paths.serial if vm is not None else None
