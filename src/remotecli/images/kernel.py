"""The guest kernel: an uncompressed ELF ``vmlinux`` cut out of a Debian ``bzImage``.

Theory of operation. A ``bzImage`` is a real-mode setup block followed by a protected-mode
stub that decompresses the kernel proper. The setup header (at offset 0x1f1, magic ``HdrS`` at
0x202) says how many 512-byte setup sectors come first (``setup_sects``) and, from boot
protocol 2.08, where the compressed payload sits inside the protected-mode part
(``payload_offset``, ``payload_length``). The payload is the ELF ``vmlinux`` compressed with one
of the kernel's formats, recognised by its magic bytes. QEMU boots that ELF directly through its
PVH entry point (the Xen ``PHYS32_ENTRY`` note), which under software emulation is far faster
than running the bzImage's own decompressor.

Everything here takes bytes and returns bytes, except zstd, which the standard library cannot
decompress and which is handed to the ``zstd`` program.
"""

from __future__ import annotations

import bz2
import lzma
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass

from remotecli.exceptions import KernelImageError

SETUP_HEADER_MAGIC = b"HdrS"
ELF_MAGIC = b"\x7fELF"
XEN_ELFNOTE_PHYS32_ENTRY = 18
PT_NOTE = 4

# Magic bytes of the payload formats the kernel can be built with (CONFIG_KERNEL_*).
_PAYLOAD_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x89LZO", "lzo"),
)


@dataclass(frozen=True)
class Payload:
    """Where the compressed ``vmlinux`` lies inside a bzImage, and how it is compressed."""

    offset: int
    length: int
    compression: str


def find_payload(bzimage: bytes) -> Payload:
    """Locate the compressed kernel inside ``bzimage`` from its setup header.

    Raises :class:`KernelImageError` when the file is not a bzImage with boot protocol 2.08 or
    later (every kernel since 2.6.26), or when the payload's compression is not recognised.
    """
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != SETUP_HEADER_MAGIC:
        raise KernelImageError(
            "the kernel file has no bzImage setup header (magic HdrS at 0x202); "
            "pass the vmlinuz file of a linux-image package"
        )
    (version,) = struct.unpack_from("<H", bzimage, 0x206)
    if version < 0x0208:
        raise KernelImageError(
            f"boot protocol {version >> 8}.{version & 0xFF} has no payload fields; "
            "use a kernel newer than 2.6.26"
        )
    setup_sects = bzimage[0x1F1] or 4  # 0 means 4, for ancient boot loaders' sake
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    if start + payload_length > len(bzimage) or payload_length == 0:
        raise KernelImageError(
            f"the payload ({payload_length} bytes at {start}) lies outside the "
            f"{len(bzimage)}-byte file; the kernel file is truncated"
        )
    head = bzimage[start : start + 8]
    for magic, name in _PAYLOAD_MAGICS:
        if head.startswith(magic):
            return Payload(offset=start, length=payload_length, compression=name)
    raise KernelImageError(
        f"unknown compression of the kernel payload (first bytes {head.hex()}); "
        "use a kernel compressed with gzip, xz, lzma, bzip2 or zstd"
    )


def decompress(data: bytes, compression: str) -> bytes:
    """Decompress one kernel payload; trailing bytes after the stream are ignored.

    The kernel build appends the uncompressed size after the stream, so every decoder here
    stops at the end of its stream rather than reading to the end of the input.
    """
    if compression == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
    if compression == "xz":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
    if compression == "lzma":
        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)
    if compression == "bzip2":
        return bz2.BZ2Decompressor().decompress(data)
    if compression == "zstd":
        return _zstd(data)
    raise KernelImageError(
        f"{compression} payloads are not supported; "
        "use a kernel compressed with gzip, xz, lzma, bzip2 or zstd"
    )


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Return the ELF ``vmlinux`` inside ``bzimage``; raise KernelImageError if it is not one."""
    payload = find_payload(bzimage)
    raw = bzimage[payload.offset : payload.offset + payload.length]
    try:
        vmlinux = decompress(raw, payload.compression)
    except (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError) as exc:
        raise KernelImageError(
            f"the {payload.compression} kernel payload does not decompress ({exc}); "
            "the kernel file is damaged: download the package again"
        ) from exc
    if not vmlinux.startswith(ELF_MAGIC):
        raise KernelImageError(
            "the decompressed kernel is not an ELF file; the bzImage layout is not the usual one"
        )
    return vmlinux


def pvh_entry(vmlinux: bytes) -> int | None:
    """Return the PVH entry address from the ELF notes of ``vmlinux``, or None without one.

    A kernel without it (built without ``CONFIG_PVH``) cannot be booted by QEMU as an ELF.
    """
    if vmlinux[4] != 2 or vmlinux[5] != 1:
        raise KernelImageError("only little-endian 64-bit ELF kernels are supported")
    (phoff,) = struct.unpack_from("<Q", vmlinux, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", vmlinux, 0x36)
    for index in range(phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", vmlinux, phoff + index * phentsize
        )
        if p_type != PT_NOTE:
            continue
        position, end = p_offset, p_offset + p_filesz
        while position + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", vmlinux, position)
            name_start = position + 12
            desc_start = name_start + _align4(namesz)
            name = vmlinux[name_start : name_start + namesz].rstrip(b"\0")
            if name == b"Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
                size = 8 if descsz >= 8 else 4
                fmt = "<Q" if size == 8 else "<I"
                (entry,) = struct.unpack_from(fmt, vmlinux, desc_start)
                return int(entry)
            position = desc_start + _align4(descsz)
    return None


def _align4(size: int) -> int:
    return (size + 3) & ~3


def _zstd(data: bytes) -> bytes:
    program = shutil.which("zstd")
    if program is None:
        raise KernelImageError("the kernel is zstd-compressed; install the zstd package")
    result = subprocess.run(
        [program, "-d", "-c", "-q"], input=data, capture_output=True, check=False
    )
    # zstd reports the appended size field as trailing garbage, after writing the whole frame.
    if not result.stdout:
        raise KernelImageError(f"zstd could not decompress the kernel: {result.stderr!r}")
    return result.stdout
