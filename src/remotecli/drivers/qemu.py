"""The qemu driver: each session a microVM, started as a copy-on-write clone of a template.

Theory of operation. The first session of a given machine (image, accelerator, memory,
command, geometry) cold-boots a *template* VM whose RAM is a shared file mapping. Once the
guest reports its display, terminal and VNC server up, the template is paused and its device
state migrated into a file with ``x-ignore-shared`` (the RAM is already in its file), then it
quits. Every session then starts QEMU with ``-incoming defer`` mapping the same RAM file
*private* — copy-on-write, so the file is never written and untouched pages are shared by
every clone through the page cache — loads the device state with ``migrate-incoming`` and
runs. The clone then receives its own wall clock, entropy, hostname and VNC password over a
second serial port from the guest's control agent, and is ready once an RFB banner arrives
through its own loopback-only ``hostfwd`` port.

Each VM is one QEMU process that this driver started; stopping asks QEMU to quit over QMP,
then kills that PID. The serial console is captured to ``serial.log`` in the session dir.
A session can also be hibernated (saved whole to its directory, QEMU gone) and resumed; that
part is in :mod:`remotecli.drivers.qemu_hibernate`. A headless run is a clone too, of the
template whose CLI waits for the host's go, which it never gets: the guest relay runs the
run's command instead (:mod:`remotecli.drivers.qemu_run`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import string
import tempfile
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import structlog

from remotecli.drivers import qemu_hibernate
from remotecli.drivers.base import (
    ProgressCallback,
    RunOutput,
    SessionSpec,
    TtyEndpoint,
    VncEndpoint,
)
from remotecli.drivers.qemu_accel import AcceleratorChoice
from remotecli.drivers.qemu_guest import (
    TtyProxy,
    collect_line,
    console_tail,
    control_exchange,
    follow_links,
    home_line,
    is_our_qemu,
    read_banner,
    read_collected,
    relay_open,
)
from remotecli.drivers.qemu_machine import (
    DEFAULT_MEMORY_MIB,
    GUEST_RELAY_PORT,
    GUEST_TTY_PORT,
    TCG_TB_SIZE_MIB,
    Machine,
    VmPaths,
    argv_for_log,
    guest_hostname,
    host_tsc_khz,
    ksm_state,
    machine_argv,
    require_qemu,
    session_line,
)
from remotecli.drivers.qemu_run import QemuRun, open_run
from remotecli.drivers.qemu_vm import (
    RESTORE_SECONDS,
    Vm,
    host_port,
    kill_recorded,
    race_exit,
    ram_identity,
    restore,
    resume_base,
    save_state,
    terminate,
    vm_record,
    watch_pid,
    watch_process,
    write_record,
)
from remotecli.drivers.qmp import QmpClient
from remotecli.exceptions import DriverError, RemoteCliError
from remotecli.images import default_cache_dir, find_image
from remotecli.providers import BUILTIN_PROVIDERS, NPM_PROVIDERS, builtin_provider
from remotecli.sandbox import SYSTEM_PATH
from remotecli.sandbox.egress import EGRESS_CHOICES, EgressFilter
from remotecli.sandbox.keep import normalize_keep
from remotecli.sandbox.uids import UidPool

log = structlog.get_logger(component="qemu")

PASSWORD_ALPHABET = string.ascii_letters + string.digits
PASSWORD_LENGTH = 8
"""VNC authentication (RFB type 2) uses at most 8 characters of the password."""

COLD_BOOT_SECONDS = 180.0
QEMU_ENVIRONMENT = {"PATH": SYSTEM_PATH, "LC_ALL": "C"}
"""All QEMU gets of the controller's environment (which may hold REMOTECLI_SECRET_KEY)."""
COMMAND_ENDED = re.compile(r"remotecli: the session command exited with status (\d{1,3})")
"""The guest's last console line when the session's command ended (``remotecli-run``)."""
COLLECT_SECONDS = 30.0
"""How long the guest may take to pack a kept sign-in (a serial line, under emulation)."""
TEMPLATE_GEOMETRY = (1280, 720)
"""The desktop size of the templates made ahead of time; a run (no display) uses it too, so
that it clones a template (and takes a pool's clone) that sessions already made."""


class QemuDriver:
    """Sessions as QEMU microVMs; one instance per controller."""

    name = "qemu"
    can_adopt = False  # microVMs live on this host

    def __init__(
        self,
        data_dir: Path,
        *,
        image_cache: Path | None = None,
        template_cache: Path | None = None,
        memory_mib: int = DEFAULT_MEMORY_MIB,
        accelerator: str | None = None,
        pool_size: int = 0,
        egress: str = "open",
        uid_pool: UidPool | None = None,
        tcg_cache_mib: int = TCG_TB_SIZE_MIB,
    ) -> None:
        """Keep templates under ``data_dir/qemu/templates``; find images in ``image_cache``.

        ``template_cache`` keeps templates elsewhere than beside the image cache (its default,
        shared by every data dir: a template is keyed on everything its state depends on).
        ``accelerator`` forces
        ``kvm`` or ``tcg``; by default KVM is probed by booting the kernel under it, and the
        verdict is remembered for this host in ``image_cache`` (see ``qemu_accel``).
        ``pool_size`` keeps that many clones per template restored, running and warmed up ahead
        of time (each costs an idle clone's memory): a session taking one only gets its clock,
        entropy, hostname and password.

        A root controller runs each QEMU as a sandbox uid of its own from ``uid_pool`` (QEMU
        drops to it before the guest runs). ``egress`` is the guest's network: ``open`` (the
        internet through QEMU's user-mode network, judged by the host's egress filter on that
        uid: never the host, its loopback or private ranges) or ``none`` (``restrict=on``);
        ``open`` falls back to ``none``, with the reason on ``/readyz``, where the host cannot
        enforce it.
        """
        if egress not in EGRESS_CHOICES:
            raise DriverError(f"egress {egress!r} is unknown; choose open or none")
        self._tcg_cache_mib = tcg_cache_mib
        self._uids = (uid_pool or UidPool()) if os.geteuid() == 0 else None
        self.egress, self._egress_reason = self._choose_egress(egress)
        self._root = data_dir / "qemu"
        self._image_cache = image_cache if image_cache is not None else default_cache_dir()
        # Beside the images, not in the data dir: a template is keyed on everything its state
        # depends on, so any data dir on this host clones from one booted once.
        self._templates = (
            template_cache if template_cache is not None else self._image_cache.parent / "templates"
        )
        self._template_state = "not prepared yet"
        self._preparing: dict[tuple[str, ...], str] = {}
        """Commands whose template is being made now → how far, in words (for the catalogue)."""
        self._warming: asyncio.Task[None] | None = None
        self._memory_mib = memory_mib
        self._accelerator = accelerator
        self._accel = AcceleratorChoice(accelerator, self._image_cache, self._root)
        self._vms: dict[str, Vm] = {}
        self._template_locks: dict[str, asyncio.Lock] = {}
        self._pool_size = pool_size
        self._pool: dict[str, list[Vm]] = {}
        self._refilling: set[str] = set()
        self._pool_tasks: set[asyncio.Task[None]] = set()
        self._watchers: set[asyncio.Task[None]] = set()
        self._asleep: dict[str, tuple[Path, Callable[[str], None] | None]] = {}
        """Hibernated sessions: id → the session dir holding their saved state, and where
        their links went (known only to the driver that hibernated them)."""

    def _choose_egress(self, wanted: str) -> tuple[str, str]:
        if wanted == "none":
            return "none", "egress none: restrict=on, nothing leaves the VM"
        if self._uids is None:
            return (
                "none",
                "egress open needs a root controller (QEMU runs as a sandbox uid the host "
                "filter judges); restrict=on, nothing leaves the VM",
            )
        try:
            egress_filter = EgressFilter.install(self._uids.first, self._uids.last)
        except RemoteCliError as exc:
            log.warning("egress_filter_failed", error=exc.message)
            return "none", f"egress open refused: {exc.message}; restrict=on"
        return "open", f"internet through QEMU's user-mode network; {egress_filter.describe()}"

    # --- the Driver seam ---------------------------------------------------------------------

    async def collect(self, session_id: str, paths: Sequence[str]) -> dict[str, bytes]:
        """Read the kept files at ``paths`` from the guest's HOME over the control channel.

        The guest packs them (``collect``); :func:`read_collected` takes only what a local
        session's HOME would give, within the same caps. {} for an unknown session.
        """
        vm = self._vms.get(session_id)
        if vm is None or not paths:
            return {}
        declared = sorted({normalize_keep(path) for path in paths})  # "~/.codex" -> ".codex"
        async with vm.control:
            answer = await control_exchange(
                vm.paths.control, collect_line(declared), "files", within=COLLECT_SECONDS
            )
        # A hostile archive is bounded work, but not on the event loop every user shares.
        return await asyncio.to_thread(read_collected, answer, declared)

    async def tty_endpoint(self, session_id: str) -> TtyEndpoint:
        """Return the VM's text terminal: a Unix socket (:meth:`tty_socket`)."""
        return TtyEndpoint(unix_path=await self.tty_socket(session_id))

    async def tty_socket(self, session_id: str) -> str:
        """Return the Unix socket of the VM's text terminal (a :class:`TtyProxy`)."""
        vm = self._vms.get(session_id)
        if vm is None or not vm.tty_port:
            raise DriverError(
                f"session {session_id} has no text terminal in this driver (a VM started "
                "before this remote-cli); use the Desktop view",
                session_id=session_id,
            )
        if vm.tty is None:
            vm.tty = await TtyProxy.start(vm.socket_dir / "tty.sock", vm.tty_port, vm.tty_secret)
        return str(vm.tty.path)

    async def connect_loopback(
        self, session_id: str, port: int, *, address: str = "127.0.0.1"
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to ``address``:``port`` on the guest's own loopback, through its relay."""
        if address not in ("127.0.0.1", "::1") or not 0 < port < 65536:
            raise DriverError(f"{address}:{port} is not on a session's loopback")
        vm = self._vms.get(session_id)
        if vm is None or not vm.relay_port:
            raise DriverError(
                f"session {session_id} cannot take sign-in callbacks (a VM started before this "
                "remote-cli); start a new session",
                session_id=session_id,
            )
        return await relay_open(vm.relay_port, vm.tty_secret, f"connect {address} {port}")

    def hosts(self) -> None:
        """Nothing: the microVMs run on the controller's own host."""

    def isolation(self) -> Mapping[str, object] | None:
        """Say which accelerator the VMs use and where that came from, for ``/readyz``; no I/O."""
        return {
            "driver": self.name,
            **self._accel.describe(),
            "template": self._template_state,
            "memory": f"{self._memory_mib} MiB per VM",
            "tcg_cache": f"{self._tcg_cache_mib} MiB per VM under TCG",
            "ksm": ksm_state(),
            "network": self._egress_reason,
            "qemu_user": (
                f"each VM as its own uid in {self._uids.first}-{self._uids.last}, under QEMU's "
                "seccomp sandbox"
                if self._uids is not None
                else "the controller's user (not root)"
            ),
            "warm_pool": self._pool_size,
        }

    def can_run(self, command: Sequence[str]) -> tuple[str, ...] | str:
        """Return the command the guest runs if its program is in the image a session would boot.

        The program is given by its bare name, which the guest resolves on its own PATH: a
        path on this host (``/usr/bin/tool``, a project's ``node_modules/.bin/claude``) means
        nothing inside the VM. A built-in provider's program needs an image built with that
        provider whose manifest lists its programs; any other program must be on the image's
        PATH (an image too old to list its programs is trusted with it).
        """
        name = os.path.basename(command[0])
        guest = (name, *command[1:])
        providers = [p.name for p in BUILTIN_PROVIDERS if p.npm_package and p.command[0] == name]
        build = f"`remotecli image build --cache-dir {self._image_cache}" + "".join(
            f" --provider {provider}" for provider in providers
        )
        try:
            image = find_image(self._image_cache, providers)
        except DriverError as exc:
            # As machine_for does: the base image serves when it holds the program after all.
            try:
                image = find_image(self._image_cache, [])
            except DriverError:
                return exc.message
            if providers and (image.programs is None or name not in image.programs):
                return exc.message  # names the build command with the provider
        if providers and image.programs is None:
            # Such an image cannot say whether the CLI is in it; starting it blind is how a
            # session became a black screen.
            return (
                f"the guest image {image.directory} does not list its programs (it was built by "
                f"an older remote-cli), so `{name}` may be missing from it; rebuild it with "
                f"{build}`"
            )
        if image.programs is not None and name not in image.programs:
            hint = f"rebuild it with {build}`" if providers else "add it to the image"
            return (
                f"`{name}` is not in the guest image {image.directory}; {hint}, or run this "
                "provider with the local driver"
            )
        return guest

    async def start(self, spec: SessionSpec, progress: ProgressCallback) -> VncEndpoint:
        """Start the session as a clone of its machine's template, building that first if new."""
        require_qemu()
        machine = await self.machine_for(spec, progress)
        template = await self.ensure_template(machine, progress)
        return await self.start_clone(spec, machine, template, progress)

    async def start_run(self, spec: SessionSpec, progress: ProgressCallback) -> RunOutput:
        """Run ``spec.command`` headless in a clone of its provider's waiting template.

        The clone is the one a session of the provider that keeps a sign-in starts from (its
        CLI waits for the agent's ``home``, which a run never sends, so the CLI never starts);
        it gets its own clock, entropy and secrets, then the guest relay writes
        ``spec.home_files`` into ``/root`` and starts the command there (``run``). The VM
        stays up after the command ended, for :meth:`collect`, until :meth:`stop`.
        """
        require_qemu()
        argv = self.can_run(spec.command)
        if isinstance(argv, str):
            raise DriverError(argv, session_id=spec.session_id)
        provider = builtin_provider(spec.provider)
        # The template's command is never run: it only names the template, and a provider's
        # own (its session's) names the template and pool its sessions already warmed.
        waiting = (
            provider.command
            if provider is not None and provider.command[0] == argv[0]
            else argv[:1]
        )
        machine = await self._machine(
            spec.provider, waiting, *TEMPLATE_GEOMETRY, progress, start_in_clone=True
        )
        template = await self.ensure_template(machine, progress)
        vm = await self._clone(spec, machine, template, progress, banner=False)
        try:
            progress("clone personalised; sending the run's command to the guest relay")
            reader, writer = await open_run(
                vm.relay_port, vm.tty_secret, argv, spec.home_files, within=RESTORE_SECONDS
            )
            vm.run = QemuRun(spec.session_id, reader, writer, vm.paths.serial)
            progress("the run's command started in the clone")
        except BaseException:
            await terminate(vm)
            raise
        vm.machine = machine
        vm.base_id = ram_identity(template / "memory")
        self._vms[spec.session_id] = vm
        write_record(spec.workdir / "vm.json", vm)
        return vm.run

    async def wait(self, session_id: str) -> str:
        """Return when the session's QEMU process ends, with its exit status in words."""
        vm = self._vms.get(session_id)
        if vm is None:
            return "no such VM"
        await vm.ended.wait()
        code = vm.process.returncode if vm.process is not None else None
        tail = console_tail(vm.paths.serial)
        ended = COMMAND_ENDED.search(tail)
        if ended is not None:
            return f"the session's command exited with status {ended.group(1)}"
        return f"qemu exited with status {code}" + (f"; console: {tail}" if tail else "")

    async def stop(self, session_id: str) -> None:
        """Ask QEMU to quit over QMP, kill it if it lingers, remove its sockets. Idempotent.

        A hibernated session's saved state is removed; a run's command is killed (its
        :meth:`~QemuRun.wait` raises) and its directory removed.
        """
        vm = self._vms.pop(session_id, None)
        if vm is not None:
            if vm.run is not None:
                vm.run.stop()  # the relay kills the command; its reader hears why
            await terminate(vm)
            if vm.run is not None:  # a run leaves nothing: its console and record go too
                shutil.rmtree(vm.paths.serial.parent, ignore_errors=True)
        asleep = self._asleep.pop(session_id, None)
        if asleep is not None:
            qemu_hibernate.discard(asleep[0])

    async def hibernate(self, session_id: str) -> bool:
        """Save the session's VM into its directory (``hibernate.state``), then quit it.

        The file holds the devices and the pages that differ from the template's RAM (all of
        them when the VM maps no template, or the template file changed under it). False when
        the VM is unknown, its machine unrecorded, or the disk lacks room for a whole guest's
        RAM. On a failed save the VM runs on and DriverError is raised.
        """
        vm = self._vms.get(session_id)
        if vm is None or vm.qmp is None or vm.machine is None or vm.run is not None:
            return False  # a run's relay connection would not survive it
        workdir = vm.paths.serial.parent
        if not qemu_hibernate.room_to_save(workdir, vm.machine.memory_mib):
            log.warning("not hibernated: too little free disk", session_id=session_id)
            return False
        began = time.monotonic()
        base = vm.paths.memory
        if base is None or not vm.base_id or ram_identity(base) != vm.base_id:
            base = None  # no template RAM under it, or not the one it mapped: save it all
        try:
            size = await qemu_hibernate.save_state(vm.qmp, workdir, base)
        except BaseException:
            with contextlib.suppress(DriverError, OSError):
                await vm.qmp.execute("cont")  # the session runs on as before
            raise
        self._vms.pop(session_id, None)
        if vm.watcher is not None:
            vm.watcher.cancel()
        await terminate(vm)
        if base is None:
            vm.paths, vm.base_id = replace(vm.paths, memory=None), ""
        write_record(workdir / "vm.json", vm, hibernated=True)
        self._asleep[session_id] = (workdir, vm.open_url)
        log.info(
            "hibernated",
            session_id=session_id,
            state_mib=round(size / (1 << 20), 1),
            seconds=round(time.monotonic() - began, 2),
        )
        return True

    async def resume(
        self, session_id: str, workdir: Path, progress: ProgressCallback
    ) -> VncEndpoint:
        """Start the session again from its ``hibernate.state``: a new QEMU, new secrets.

        The state is removed once the guest answered with its banner; until then a failed or
        cancelled resume leaves it hibernated.
        """
        require_qemu()
        state = workdir / qemu_hibernate.STATE_NAME
        if not state.is_file():
            raise DriverError(
                f"session {session_id} has no saved state in {workdir}; it cannot be resumed",
                session_id=session_id,
            )
        machine = qemu_hibernate.read_machine(workdir)
        base = resume_base(workdir)
        vm = await self._spawn(session_id, machine, workdir, base, template=False)
        vm.machine, vm.base_id = machine, ram_identity(base) if base is not None else ""
        try:
            # The new PID first: a controller that dies during the load kills this QEMU on
            # its next start and keeps the saved state.
            write_record(workdir / "vm.json", vm)
            assert vm.qmp is not None
            await qemu_hibernate.load_state(vm.qmp, state)
            progress("memory and devices loaded from the hibernated state")
            answer = await self._personalise(vm, session_id)
            progress(f"VNC banner read; guest took its clock, new password and secret ({answer})")
            vm.open_url = self._asleep.get(session_id, (workdir, None))[1]
            if vm.open_url is not None:
                links = await relay_open(vm.relay_port, vm.tty_secret, "links")
                vm.links = asyncio.create_task(
                    follow_links(vm.relay_port, vm.tty_secret, vm.open_url, first=links),
                    name=f"links-{session_id}",
                )
            qemu_hibernate.write_json(workdir / "vm.json", vm_record(vm))
        except BaseException:
            await terminate(vm)
            raise
        self._vms[session_id] = vm
        self._asleep.pop(session_id, None)
        qemu_hibernate.discard(workdir)
        return VncEndpoint(host="127.0.0.1", port=vm.port, password=vm.password)

    async def recover_hibernated(self, session_id: str, workdir: Path) -> bool:
        """Take back a session hibernated by a previous controller: True if its state is whole.

        A QEMU still running for it (a hibernation or a resume the controller did not see
        through) is killed: the saved state is the session. A save cut short is removed.
        """
        (workdir / qemu_hibernate.PARTIAL_NAME).unlink(missing_ok=True)
        if not (workdir / qemu_hibernate.STATE_NAME).is_file():
            return False
        try:
            qemu_hibernate.read_machine(workdir)
        except DriverError as exc:
            log.warning("hibernated state unusable", session_id=session_id, error=exc.message)
            qemu_hibernate.discard(workdir)
            return False
        kill_recorded(workdir / "vm.json")
        self._asleep[session_id] = (workdir, None)  # links of a restarted controller: not followed
        return True

    async def recover(self, session_id: str, workdir: Path) -> VncEndpoint | None:
        """Reattach to a VM left running by a previous controller, or kill what is left of it."""
        record = workdir / "vm.json"
        if (workdir / qemu_hibernate.STATE_NAME).is_file():
            kill_recorded(record)  # it was saved: the state is the session now
            return None
        (workdir / qemu_hibernate.PARTIAL_NAME).unlink(missing_ok=True)
        try:
            info = json.loads(record.read_text())
        except (OSError, ValueError):
            return None
        if info.get("run"):
            # Its command's output went to the connection of the controller that is gone.
            kill_recorded(record)
            shutil.rmtree(workdir, ignore_errors=True)
            return None
        memory = Path(info["memory"]) if info.get("memory") else None
        paths = VmPaths(Path(info["qmp"]), Path(info["control"]), Path(info["serial"]), memory)
        vm = Vm(session_id, None, int(info["pid"]), paths, Path(info["socket_dir"]))
        if not is_our_qemu(vm.pid, str(paths.qmp)):
            shutil.rmtree(vm.socket_dir, ignore_errors=True)
            record.unlink(missing_ok=True)
            return None
        try:
            vm.qmp = await QmpClient.connect(str(paths.qmp), within=5.0)
            vm.port, vm.password = int(info["port"]), str(info["password"])
            vm.tty_port, vm.tty_secret = (
                int(info.get("tty_port", 0)),
                str(info.get("tty_secret", "")),
            )
            vm.relay_port = int(info.get("relay_port", 0))
            with contextlib.suppress(DriverError):
                vm.machine = qemu_hibernate.machine_from_record(info.get("machine"))
            if not (await vm.qmp.execute("query-status")).get("running"):
                await vm.qmp.execute("cont")  # paused by a hibernation that did not finish
            await read_banner(vm.port, within=5.0)
        except DriverError:
            await terminate(vm)
            record.unlink(missing_ok=True)
            return None
        self._vms[session_id] = vm
        self._watch(vm, watch_pid(vm))
        return VncEndpoint(host="127.0.0.1", port=vm.port, password=vm.password)

    def detach(self, session_id: str) -> bool:
        """Forget a session without stopping its VM, as a controller that exits keeping it.

        The VM keeps running; a later driver takes it back with :meth:`recover`. False for a
        session this driver does not run.
        """
        vm = self._vms.get(session_id)
        if vm is None or vm.run is not None:
            return False  # a run's output goes to this controller's connection only
        del self._vms[session_id]
        if vm.watcher is not None:
            vm.watcher.cancel()  # the VM outlives this driver; nothing here waits for its end
        if vm.qmp is not None:
            vm.qmp.close()  # QEMU serves one monitor client at a time
        if vm.tty is not None:
            vm.tty.close()  # the next driver opens its own
        if vm.links is not None:
            vm.links.cancel()  # links are shown by the controller that started the session
        return True

    async def prepare(self) -> None:
        """Start, in the background, the KVM probe and the templates, unless known.

        The shell's template first, then one for each built-in provider the guest image holds:
        a first session then clones at once instead of waiting for a cold boot. ``/readyz``
        shows how far the shell's template is (``template``); the provider listing says which
        provider's is still being made (:meth:`preparing`).
        """
        await self._accel.prepare(host_tsc_khz(_read_cpuinfo()))
        self._warming = asyncio.create_task(self._warm_templates(), name="qemu-templates")

    async def make_templates(self) -> str:
        """Make the templates :meth:`prepare` would start in the background, now, and say how
        the shell's went (a cluster host does this before it takes sessions)."""
        await self._accel.prepare(host_tsc_khz(_read_cpuinfo()))
        await self._warm_templates()
        return self._template_state

    def preparing(self, command: Sequence[str]) -> str | None:
        """Say how far the template for ``command`` is, while it is being made; else None."""
        return self._preparing.get(tuple(command))

    async def _warm_templates(self) -> None:
        shell, *others = BUILTIN_PROVIDERS
        held = [p for p in others if self.can_run(p.command) == tuple(p.command)]
        for provider in held:
            self._preparing[tuple(provider.command)] = "waiting for its microVM template"
        self._template_state = await self._warm_template(shell.name, shell.command, False)
        for provider in held:
            await self._warm_template(provider.name, provider.command, bool(provider.keep))

    async def _warm_template(self, name: str, command: Sequence[str], start_in_clone: bool) -> str:
        """Make sure ``command``'s template exists; return how that went, in words."""
        began = time.monotonic()
        key = tuple(command)

        def progress(step: str) -> None:
            state = f"preparing ({time.monotonic() - began:.0f} s): {step}"
            self._preparing[key] = state
            if name == BUILTIN_PROVIDERS[0].name:
                self._template_state = state

        try:
            machine = await self._machine(
                name, command, *TEMPLATE_GEOMETRY, progress, start_in_clone=start_in_clone
            )
            template = machine.template_key()
            if not (self._templates / template / "template.json").exists():
                progress(f"cold-booting the {name} template; the first session waits for it")
            await self.ensure_template(machine, progress)
        except DriverError as exc:
            log.warning("template not prepared", provider=name, error=exc.message)
            return f"not prepared: {exc.message}"
        finally:
            self._preparing.pop(key, None)
        return f"ready ({template}; {time.monotonic() - began:.1f} s to prepare)"

    async def close(self) -> None:
        """Stop every VM this driver started, the warm pool's and a KVM probe's included."""
        if self._warming is not None:
            self._warming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._warming
        await self._accel.close()
        for task in list(self._pool_tasks):
            task.cancel()
        await asyncio.gather(*self._pool_tasks, return_exceptions=True)
        waiting = [vm for vms in self._pool.values() for vm in vms]
        self._pool.clear()
        await asyncio.gather(*(self.stop(session_id) for session_id in list(self._vms)))
        await asyncio.gather(*(terminate(vm) for vm in waiting))
        shutil.rmtree(self._root / "pool", ignore_errors=True)
        # Every VM is gone, so each watcher is finishing; a detached one was cancelled.
        await asyncio.gather(*self._watchers, return_exceptions=True)

    # --- templates and clones ----------------------------------------------------------------

    async def machine_for(self, spec: SessionSpec, progress: ProgressCallback) -> Machine:
        """Return the machine a session runs on: image for its provider, accelerator, command.

        Raises DriverError, with the fix, when the guest cannot run the command: the session
        fails at once instead of showing an empty screen.
        """
        answer = self.can_run(spec.command)
        if isinstance(answer, str):
            raise DriverError(answer, session_id=spec.session_id)
        return await self._machine(
            spec.provider,
            answer,
            spec.width,
            spec.height,
            progress,
            start_in_clone=spec.keeps_signin,
        )

    async def _machine(
        self,
        provider: str,
        command: Sequence[str],
        width: int,
        height: int,
        progress: ProgressCallback,
        *,
        start_in_clone: bool = False,
    ) -> Machine:
        providers = [provider] if provider in NPM_PROVIDERS else []
        try:
            image = find_image(self._image_cache, providers)
        except DriverError:
            if not providers:
                raise
            image = find_image(self._image_cache, [])  # the command may exist in the base image
        tsc_khz = host_tsc_khz(_read_cpuinfo())
        accelerator = await self._accel.choose(image, tsc_khz, progress)
        return Machine(
            image=image,
            accelerator=accelerator,
            memory_mib=self._memory_mib,
            tsc_khz=tsc_khz,
            command=tuple(command),
            width=width,
            height=height,
            tcg_cache_mib=self._tcg_cache_mib,
            start_in_clone=start_in_clone,
        )

    async def ensure_template(self, machine: Machine, progress: ProgressCallback) -> Path:
        """Return the template directory for ``machine``, cold-booting and saving it if needed."""
        key = machine.template_key()
        directory = self._templates / key
        lock = self._template_locks.setdefault(key, asyncio.Lock())
        async with lock:
            if (directory / "template.json").exists():
                return directory
            directory.mkdir(parents=True, exist_ok=True)
            lock_file = await asyncio.to_thread(_flock, directory.with_suffix(".lock"))
            try:
                if not (directory / "template.json").exists():
                    await self._make_template(machine, directory, progress)
            finally:
                lock_file.close()
        return directory

    async def start_clone(
        self, spec: SessionSpec, machine: Machine, template: Path, progress: ProgressCallback
    ) -> VncEndpoint:
        """Start one session as a copy-on-write clone of ``template``; return its endpoint."""
        vm = await self._clone(spec, machine, template, progress)
        try:
            if spec.open_url is not None:
                # Listening before the CLI (re)starts: the relay drops links nobody reads.
                links = await relay_open(vm.relay_port, vm.tty_secret, "links")
                vm.links = asyncio.create_task(
                    follow_links(vm.relay_port, vm.tty_secret, spec.open_url, first=links),
                    name=f"links-{spec.session_id}",
                )
            if spec.home_files or machine.start_in_clone:
                async with vm.control:
                    await control_exchange(
                        vm.paths.control,
                        home_line(spec.home_files),
                        "ok home",
                        within=RESTORE_SECONDS,
                    )
                progress(
                    "the CLI started in the clone"
                    + (", with the kept sign-in in HOME" if spec.home_files else "")
                )
        except BaseException:
            await terminate(vm)
            raise
        vm.machine, vm.open_url = machine, spec.open_url
        vm.base_id = ram_identity(template / "memory")
        self._vms[spec.session_id] = vm
        write_record(spec.workdir / "vm.json", vm)
        return VncEndpoint(host="127.0.0.1", port=vm.port, password=vm.password)

    async def _clone(
        self,
        spec: SessionSpec,
        machine: Machine,
        template: Path,
        progress: ProgressCallback,
        *,
        banner: bool = True,
    ) -> Vm:
        """Return a running clone of ``template`` (the pool's, else restored now) that has its
        own clock, entropy, name and secrets; nothing is left running if this fails."""
        spec.workdir.mkdir(parents=True, exist_ok=True)
        vm = self._take_from_pool(machine, spec)
        self._refill_pool(machine, template)
        if vm is None:
            vm = await self._spawn(
                spec.session_id, machine, spec.workdir, template / "memory", template=False
            )
            restored = False
        else:
            progress("took a restored, warmed-up clone from the warm pool")
            restored = True
        try:
            if not restored:
                await restore(vm, template)
                progress("clone restored from the template")
            answer = await self._personalise(vm, spec.session_id, banner=banner)
        except BaseException:
            await terminate(vm)
            raise
        progress(
            ("VNC banner read; " if banner else "")
            + f"guest took its clock, entropy, name, password ({answer})"
        )
        return vm

    # --- internals ---------------------------------------------------------------------------

    def _watch(self, vm: Vm, watcher: Coroutine[Any, Any, None]) -> None:
        """Run ``watcher`` as ``vm``'s task, kept until it ends so :meth:`close` can await it."""
        task = asyncio.get_running_loop().create_task(watcher)
        vm.watcher = task
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    def _take_from_pool(self, machine: Machine, spec: SessionSpec) -> Vm | None:
        """Return a waiting QEMU for ``machine``, its logs moved into the session dir."""
        waiting = self._pool.get(machine.template_key(), [])
        while waiting:
            vm = waiting.pop(0)
            if vm.ended.is_set():
                continue
            pool_dir = vm.paths.serial.parent
            serial = spec.workdir / "serial.log"
            vm.paths.serial.rename(serial)  # QEMU keeps writing through its open descriptor
            (pool_dir / "qemu.log").rename(spec.workdir / "qemu.log")
            pool_dir.rmdir()
            vm.paths = replace(vm.paths, serial=serial)
            vm.session_id = spec.session_id
            return vm
        return None

    def _refill_pool(self, machine: Machine, template: Path) -> None:
        key = machine.template_key()
        if self._pool_size <= 0 or key in self._refilling:
            return
        self._refilling.add(key)
        task = asyncio.get_running_loop().create_task(self._fill_pool(machine, template, key))
        self._pool_tasks.add(task)
        task.add_done_callback(self._pool_tasks.discard)

    async def _fill_pool(self, machine: Machine, template: Path, key: str) -> None:
        waiting = self._pool.setdefault(key, [])
        try:
            while len(waiting) < self._pool_size:
                directory = self._root / "pool" / secrets.token_hex(6)
                directory.mkdir(parents=True)
                vm = await self._spawn(
                    "pool", machine, directory, template / "memory", template=False
                )
                try:
                    # Restore and run each code path a session needs once, so the clone's
                    # translation cache is warm when a session takes it.
                    await restore(vm, template)
                    vm.port = await host_port(vm)
                    await read_banner(vm.port, within=RESTORE_SECONDS)
                    await control_exchange(vm.paths.control, b"ping\n", "pong", within=5.0)
                except BaseException:
                    await terminate(vm)
                    raise
                waiting.append(vm)
        except DriverError as exc:
            log.warning("warm pool: could not start QEMU", error=exc.message)
        finally:
            self._refilling.discard(key)

    async def _personalise(self, vm: Vm, session_id: str, *, banner: bool = True) -> str:
        """Give a restored VM its own clock, entropy, hostname and VNC password; read a banner.

        Returns the agent's answer. The banner comes first: Xvnc rereads the password file on
        each connection, and the agent rewrites that file in place when the line arrives. A
        run (``banner`` False) reads none: no VNC connection of the host's is ever made to it.
        """
        vm.password = "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(PASSWORD_LENGTH))
        vm.tty_secret = secrets.token_hex(32)
        line = session_line(
            int(time.time()),
            guest_hostname(session_id),
            vm.password,
            secrets.token_hex(32),
            vm.tty_secret,
        )
        if not vm.port:
            vm.port = await host_port(vm)
        vm.tty_port = await host_port(vm, GUEST_TTY_PORT)
        vm.relay_port = await host_port(vm, GUEST_RELAY_PORT)
        if banner:
            await read_banner(vm.port, within=RESTORE_SECONDS)
        async with vm.control:
            return await control_exchange(vm.paths.control, line, "ok ", within=RESTORE_SECONDS)

    async def _make_template(
        self, machine: Machine, directory: Path, progress: ProgressCallback
    ) -> None:
        progress(f"cold-booting the template VM ({machine.accelerator}); this happens once")
        started = time.monotonic()
        memory = directory / "memory"
        state = directory / "state"
        memory.unlink(missing_ok=True)
        vm = await self._spawn("template", machine, directory, memory, template=True)
        try:
            await control_exchange(vm.paths.control, b"", "ready", within=COLD_BOOT_SECONDS)
            vm.port = await host_port(vm)
            await read_banner(vm.port, within=COLD_BOOT_SECONDS)
            boot_seconds = time.monotonic() - started
            progress(f"template booted in {boot_seconds:.1f} s; saving its state")
            assert vm.qmp is not None
            await vm.qmp.execute("stop")
            await vm.qmp.execute(
                "migrate-set-capabilities",
                capabilities=[{"capability": "x-ignore-shared", "state": True}],
            )
            partial = directory / "state.partial"
            await save_state(vm.qmp, partial)
            partial.rename(state)
        except BaseException:
            await terminate(vm)
            memory.unlink(missing_ok=True)
            raise
        await terminate(vm)
        (directory / "template.json").write_text(
            json.dumps({"boot_seconds": round(boot_seconds, 2), "saved_at": time.time()}) + "\n"
        )

    async def _spawn(
        self,
        session_id: str,
        machine: Machine,
        workdir: Path,
        memory: Path | None,
        *,
        template: bool,
    ) -> Vm:
        # Unix socket paths are limited to 107 bytes; a private short directory keeps them short.
        socket_dir = Path(tempfile.mkdtemp(prefix="rcli-qemu-"))
        paths = VmPaths(
            qmp=socket_dir / "qmp.sock",
            control=socket_dir / "control.sock",
            serial=workdir / "serial.log",
            memory=memory,
        )
        # A template runs only our own image and command, and needs no network.
        lease = self._uids.lease() if self._uids is not None else None
        argv = machine_argv(
            machine,
            paths,
            share_memory=template,
            incoming=not template,
            egress="none" if template else self.egress,
            runas=lease.uid if lease is not None else None,
        )
        log_path = workdir / "qemu.log"
        try:
            with log_path.open("w") as log:
                log.write(argv_for_log(argv) + "\n")
                log.flush()
                process = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                    env=QEMU_ENVIRONMENT,  # never the controller's keys or tokens
                )
        except BaseException:
            if lease is not None:
                lease.release()
            shutil.rmtree(socket_dir, ignore_errors=True)
            raise
        vm = Vm(session_id, process, process.pid, paths, socket_dir, lease=lease)
        self._watch(vm, watch_process(vm))
        try:
            vm.qmp = await race_exit(vm, QmpClient.connect(str(paths.qmp), within=10.0))
        except BaseException:
            await terminate(vm)
            raise
        return vm


def _flock(path: Path) -> TextIO:
    file = path.open("a")
    fcntl.flock(file, fcntl.LOCK_EX)
    return file


def _read_cpuinfo() -> str:
    return Path("/proc/cpuinfo").read_text()


__all__ = ["QemuDriver"]
