"""The guest's initrd: static busybox, the modules that reach the root disk, and a tiny /init.

Theory of operation. Debian's kernel builds virtio-mmio, virtio-blk, virtio-net and ext4 as
modules, so something must load them before the root filesystem can be mounted. This initrd
holds a static busybox, those modules with everything they depend on (read from each module's
own ``.modinfo`` section: the package carries no ``modules.dep``), and an ``/init`` that loads
them in dependency order, mounts the root disk read-only and switches to the guest's own init.
The archive is written here in the kernel's ``newc`` cpio format, uncompressed: it is small and
the kernel unpacks it faster than it would decompress it under emulation.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from remotecli.exceptions import InitrdError

# What the root disk and the network need, beyond the kernel's built-ins. crc32c is looked up
# by name through the crypto API (ext4 metadata checksums), so no ``depends=`` line names it.
ROOT_MODULES = ("virtio_mmio", "virtio_blk", "virtio_net", "ext4", "crc32c_generic")

GUEST_INIT = "/sbin/remotecli-init"

INIT_SCRIPT = f"""#!/bin/busybox sh
# remote-cli initrd: load the disk modules, mount the root read-only, hand over to its init.
/bin/busybox --install -s /bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev
for module in $(cat /modules.order); do
  insmod "/lib/modules/$module.ko" || echo "initrd: insmod $module failed"
done
tries=0
while [ ! -b /dev/vda ]; do
  tries=$((tries + 1))
  if [ "$tries" -gt 2000 ]; then echo "initrd: no /dev/vda: is the root disk attached?"; exec sh; fi
  usleep 5000
done
if ! mount -t ext4 -o ro,noatime /dev/vda /newroot; then
  echo "initrd: cannot mount /dev/vda"; exec sh
fi
mount --move /dev /newroot/dev
umount /proc
exec switch_root /newroot {GUEST_INIT}
"""


@dataclass(frozen=True)
class CpioEntry:
    """One member of a newc archive: a directory, a regular file or a symbolic link."""

    path: str
    mode: int
    data: bytes = b""


def modinfo(module: bytes) -> dict[str, str]:
    """Return the ``key=value`` pairs of a kernel module's ``.modinfo`` ELF section."""
    if module[:4] != b"\x7fELF" or module[4] != 2:
        raise InitrdError("a module file is not a 64-bit ELF object; the package is damaged")
    (shoff,) = struct.unpack_from("<Q", module, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", module, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        (name,) = struct.unpack_from("<I", module, base)
        offset, size = struct.unpack_from("<QQ", module, base + 0x18)
        return name, offset, size

    _, names_offset, _ = section(shstrndx)
    for index in range(shnum):
        name_index, offset, size = section(index)
        end = module.index(b"\0", names_offset + name_index)
        if module[names_offset + name_index : end] == b".modinfo":
            pairs: dict[str, str] = {}
            for item in module[offset : offset + size].split(b"\0"):
                key, sep, value = item.decode("utf-8", "replace").partition("=")
                if sep:
                    pairs.setdefault(key, value)
            return pairs
    return {}


def index_modules(modules_root: Path) -> dict[str, Path]:
    """Map each module name (``virtio_blk``) to its file under ``lib/modules/VERSION/kernel``."""
    found: dict[str, Path] = {}
    for path in modules_root.rglob("*.ko"):
        found[path.name.removesuffix(".ko").replace("-", "_")] = path
    return found


def load_order(wanted: Iterable[str], depends: Mapping[str, Iterable[str]]) -> list[str]:
    """Order ``wanted`` and their dependencies so each module comes after what it needs.

    ``depends`` maps a module to the names it depends on; a name absent from it is taken to
    be built into the kernel and is left out.
    """
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order or name not in depends:
            return
        if name in visiting:
            raise InitrdError(f"modules depend on each other in a cycle through {name}")
        visiting.add(name)
        for dependency in depends[name]:
            visit(dependency)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


def module_dependencies(index: Mapping[str, Path], wanted: Iterable[str]) -> dict[str, list[str]]:
    """Read the ``depends=`` of ``wanted`` and, transitively, of what they depend on."""
    result: dict[str, list[str]] = {}
    pending = list(wanted)
    while pending:
        name = pending.pop()
        if name in result:
            continue
        path = index.get(name)
        if path is None:
            raise InitrdError(
                f"kernel module {name} is neither in the package nor built in; "
                "use Debian's linux-image-amd64"
            )
        info = modinfo(path.read_bytes())
        needed = [item.replace("-", "_") for item in info.get("depends", "").split(",") if item]
        result[name] = needed
        pending.extend(needed)
    return result


def newc_archive(entries: Iterable[CpioEntry]) -> bytes:
    """Write ``entries`` as a newc ("070701") cpio archive, the format the kernel unpacks."""
    out = bytearray()
    inode = 1
    for entry in [*entries, CpioEntry("TRAILER!!!", 0)]:
        name = entry.path.lstrip("/").encode() + b"\0"
        fields = (
            inode, entry.mode, 0, 0, 1, 0, len(entry.data), 0, 0, 0, 0, len(name), 0,
        )  # fmt: skip
        out += b"070701" + b"".join(f"{value:08x}".encode() for value in fields)
        out += name
        out += b"\0" * (-len(out) % 4)
        out += entry.data
        out += b"\0" * (-len(out) % 4)
        inode += 1
    return bytes(out)


def build_initrd(modules_root: Path, busybox: bytes) -> tuple[bytes, list[str]]:
    """Return the initrd archive and the module load order, for the kernel in ``modules_root``.

    ``modules_root`` is the ``lib/modules/VERSION`` directory of the unpacked kernel package;
    ``busybox`` is a statically linked busybox binary.
    """
    index = index_modules(modules_root)
    builtin_file = modules_root / "modules.builtin"
    builtin = set()
    if builtin_file.exists():
        builtin = {
            Path(line).name.removesuffix(".ko").replace("-", "_")
            for line in builtin_file.read_text().split()
        }
    wanted = [name for name in ROOT_MODULES if name not in builtin]
    depends = module_dependencies(index, wanted)
    order = load_order(wanted, depends)
    entries = [
        CpioEntry("bin", 0o040755),
        CpioEntry("lib", 0o040755),
        CpioEntry("lib/modules", 0o040755),
        CpioEntry("bin/busybox", 0o100755, busybox),
        CpioEntry("bin/sh", 0o120777, b"busybox"),
        CpioEntry("init", 0o100755, INIT_SCRIPT.encode()),
        CpioEntry("modules.order", 0o100644, "\n".join(order).encode() + b"\n"),
    ]
    entries += [
        CpioEntry(f"lib/modules/{name}.ko", 0o100644, index[name].read_bytes()) for name in order
    ]
    return newc_archive(entries), order
