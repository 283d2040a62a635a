"""The guest image's pure parts: vmlinux extraction, PVH note, module order, newc archives."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from remotecli.exceptions import DriverError, InitrdError, KernelImageError
from remotecli.images import initrd, kernel
from remotecli.images.build import find_image, image_key, image_recipe
from remotecli.images.clis import check_providers
from remotecli.images.rootfs import packages_for

SETUP_SECTS = 2


def elf_with_pvh_note(entry: int | None) -> bytes:
    """A minimal little-endian ELF64 whose one PT_NOTE segment holds a Xen PHYS32_ENTRY note."""
    note = b""
    if entry is not None:
        note = struct.pack("<III", 4, 4, kernel.XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0"
        note += struct.pack("<I", entry)
    header = bytearray(64)
    header[:4] = b"\x7fELF"
    header[4], header[5], header[6] = 2, 1, 1
    struct.pack_into("<Q", header, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", header, 0x36, 56, 1)  # e_phentsize, e_phnum
    program_header = struct.pack("<IIQQQQQQ", kernel.PT_NOTE, 4, 64 + 56, 0, 0, len(note), 0, 4)
    return bytes(header) + program_header + note


def bzimage(payload: bytes) -> bytes:
    """A bzImage-shaped file: setup sectors with a 2.15 header, then the payload at offset 16."""
    setup = bytearray((SETUP_SECTS + 1) * 512)
    setup[0x1F1] = SETUP_SECTS
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x020F)
    struct.pack_into("<II", setup, 0x248, 16, len(payload))
    return bytes(setup) + b"\0" * 16 + payload + b"\xaa\xbb\xcc\xdd"


VMLINUX = elf_with_pvh_note(0x1000850) + bytes(range(256)) * 64


@pytest.mark.parametrize(
    ("compression", "compress"),
    [
        ("xz", lambda data: lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)),
        ("gzip", gzip.compress),
        ("bzip2", bz2.compress),
        ("lzma", lambda data: lzma.compress(data, format=lzma.FORMAT_ALONE)),
    ],
)
def test_vmlinux_is_extracted_from_each_payload_format(compression: str, compress: object) -> None:
    """The ELF kernel comes out byte for byte, whatever the payload's compression."""
    assert callable(compress)
    image = bzimage(compress(VMLINUX) + struct.pack("<I", len(VMLINUX)))
    assert kernel.find_payload(image).compression == compression
    assert kernel.extract_vmlinux(image) == VMLINUX


@pytest.mark.skipif(shutil.which("zstd") is None, reason="the zstd program is not installed")
def test_zstd_payload_goes_through_the_zstd_program() -> None:
    """A zstd payload (which the standard library cannot read) is decompressed by zstd."""
    packed = subprocess.run(["zstd", "-q", "-c"], input=VMLINUX, capture_output=True, check=True)
    assert kernel.extract_vmlinux(bzimage(packed.stdout)) == VMLINUX


def test_a_file_without_setup_header_is_refused() -> None:
    """A file that is not a bzImage is refused with a message naming the missing header."""
    with pytest.raises(KernelImageError, match="HdrS"):
        kernel.extract_vmlinux(b"\0" * 4096)


def test_an_unknown_payload_compression_is_refused() -> None:
    """A payload in no known format is refused, naming its first bytes."""
    with pytest.raises(KernelImageError, match="unknown compression"):
        kernel.extract_vmlinux(bzimage(b"\x01\x02\x03\x04" * 8))


def test_a_payload_that_is_not_elf_is_refused() -> None:
    """A payload that decompresses to something other than ELF is refused."""
    with pytest.raises(KernelImageError, match="not an ELF"):
        kernel.extract_vmlinux(bzimage(gzip.compress(b"not a kernel" * 10)))


def test_pvh_entry_is_read_from_the_xen_note() -> None:
    """The PVH entry address comes from the Xen PHYS32_ENTRY note; None without the note."""
    assert kernel.pvh_entry(elf_with_pvh_note(0x1000850)) == 0x1000850
    assert kernel.pvh_entry(elf_with_pvh_note(None)) is None


def module_file(depends: str) -> bytes:
    """A minimal ELF64 relocatable object with a .modinfo section holding ``depends=``."""
    modinfo = f"license=GPL\0depends={depends}\0vermagic=6.1.0\0".encode()
    names = b"\0.modinfo\0.shstrtab\0"
    data_offset = 64
    names_offset = data_offset + len(modinfo)
    section_offset = (names_offset + len(names) + 7) & ~7
    header = bytearray(64)
    header[:4] = b"\x7fELF"
    header[4], header[5], header[6] = 2, 1, 1
    struct.pack_into("<Q", header, 0x28, section_offset)
    struct.pack_into("<HHH", header, 0x3A, 64, 3, 2)
    null = bytes(64)
    info = struct.pack("<IIQQQQIIQQ", 1, 1, 0, 0, data_offset, len(modinfo), 0, 0, 1, 0)
    strtab = struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, names_offset, len(names), 0, 0, 1, 0)
    body = bytes(header) + modinfo + names
    return body + b"\0" * (section_offset - len(body)) + null + info + strtab


def test_modinfo_reads_the_depends_line() -> None:
    """The ``depends=`` value is read from a module's .modinfo section."""
    assert initrd.modinfo(module_file("virtio,virtio_ring"))["depends"] == "virtio,virtio_ring"


def test_dependencies_are_loaded_first_and_builtins_left_out() -> None:
    """Each module comes after what it depends on; names absent from the map are built in."""
    depends = {
        "ext4": ["jbd2", "mbcache", "crc16"],
        "jbd2": [],
        "mbcache": [],
        "crc16": [],
        "virtio_blk": ["virtio", "virtio_ring"],
        "virtio": [],
        "virtio_ring": [],
    }
    order = initrd.load_order(["virtio_blk", "ext4", "builtin_thing"], depends)
    assert order.index("virtio") < order.index("virtio_blk")
    assert order.index("jbd2") < order.index("ext4")
    assert "builtin_thing" not in order
    assert len(order) == len(set(order)) == 7


def test_dependency_cycles_are_refused() -> None:
    """A cycle in module dependencies is an error, not an endless loop."""
    with pytest.raises(InitrdError, match="cycle"):
        initrd.load_order(["a"], {"a": ["b"], "b": ["a"]})


def test_modules_and_their_dependencies_are_found_on_disk(tmp_path: Path) -> None:
    """Dependencies are read from the module files themselves, transitively."""
    for name, depends in (("virtio_blk", "virtio"), ("virtio", "virtio_ring"), ("virtio_ring", "")):
        (tmp_path / f"{name}.ko").write_bytes(module_file(depends))
    index = initrd.index_modules(tmp_path)
    found = initrd.module_dependencies(index, ["virtio_blk"])
    assert found == {"virtio_blk": ["virtio"], "virtio": ["virtio_ring"], "virtio_ring": []}


@pytest.mark.skipif(shutil.which("cpio") is None, reason="the cpio program is not installed")
def test_newc_archive_is_read_back_by_cpio(tmp_path: Path) -> None:
    """Debian's cpio unpacks our newc archive into the same files, modes and link."""
    archive = initrd.newc_archive(
        [
            initrd.CpioEntry("bin", 0o040755),
            initrd.CpioEntry("bin/tool", 0o100755, b"#!/bin/sh\necho hi\n"),
            initrd.CpioEntry("bin/alias", 0o120777, b"tool"),
            initrd.CpioEntry("odd-size", 0o100644, b"12345"),
        ]
    )
    subprocess.run(["cpio", "-idm", "--quiet"], input=archive, cwd=tmp_path, check=True)
    assert (tmp_path / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (tmp_path / "bin/tool").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "bin/alias").readlink() == Path("tool")
    assert (tmp_path / "odd-size").read_bytes() == b"12345"


def test_image_key_depends_on_every_input() -> None:
    """The same inputs give the same key; another provider, provider version or kernel version
    gives another."""
    kernel_package = "linux-image-6.1.0-1-amd64"
    base = image_key([], kernel_package, "6.1.1-1")
    assert base == image_key([], kernel_package, "6.1.1-1")
    assert base != image_key(["codex"], kernel_package, "6.1.1-1")
    assert base != image_key([], kernel_package, "6.1.1-2")
    codex = image_key(["codex"], kernel_package, "6.1.1-1", {"codex": "0.171.0"})
    assert codex == image_key(["codex"], kernel_package, "6.1.1-1", {"codex": "0.171.0"})
    assert codex != image_key(["codex"], kernel_package, "6.1.1-1", {"codex": "0.172.0"})


def test_the_recipe_names_the_guests_node_only_with_providers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another pinned Node.js changes the recipe of an image with CLIs, not the base image's."""
    base, claude = image_recipe([]), image_recipe(["claude-code"], {"claude-code": "2.1.197"})
    monkeypatch.setattr("remotecli.images.clis.NODE_VERSION", "99.0.0")
    assert image_recipe([]) == base
    assert image_recipe(["claude-code"], {"claude-code": "2.1.197"}) != claude


def test_npm_providers_bring_cas_not_debians_node_and_unknown_ones_are_refused() -> None:
    """An image with CLIs adds the CA certificates but not Debian's Node.js (18, too old for
    Gemini CLI; the builder installs its own); an unknown provider name is an error."""
    assert "ca-certificates" in packages_for(["claude-code"])
    assert "nodejs" not in packages_for(["gemini-cli"])
    assert packages_for([]) == [p for p in packages_for(["codex"]) if p != "ca-certificates"]
    with pytest.raises(DriverError, match="unknown provider"):
        check_providers(["no-such-cli"])


def test_find_image_names_the_build_command_when_the_cache_is_empty(tmp_path: Path) -> None:
    """Without a built image the error tells the user the command that builds one."""
    with pytest.raises(DriverError, match="remotecli image build"):
        find_image(tmp_path / "empty")


def test_find_image_prefers_exactly_the_providers_asked_for(tmp_path: Path) -> None:
    """A plain image serves the shell even when a newer image also holds a provider CLI."""
    for key, providers, built_at in (("plain", [], 1.0), ("claude", ["claude-code"], 2.0)):
        (tmp_path / key).mkdir()
        recipe = image_recipe(providers)
        manifest = {"key": key, "recipe": recipe, "providers": providers, "built_at": built_at}
        (tmp_path / key / "manifest.json").write_text(json.dumps(manifest))
    assert find_image(tmp_path).key == "plain"
    assert find_image(tmp_path, ["claude-code"]).key == "claude"


def test_find_image_passes_over_an_image_of_another_recipe(tmp_path: Path) -> None:
    """An image built from other guest scripts (an older remote-cli) is never booted."""
    for key, recipe, built_at in (("old", "0" * 16, 2.0), ("current", image_recipe([]), 1.0)):
        (tmp_path / key).mkdir()
        manifest = {"key": key, "recipe": recipe, "providers": [], "built_at": built_at}
        (tmp_path / key / "manifest.json").write_text(json.dumps(manifest))
    assert find_image(tmp_path).key == "current"
    (tmp_path / "current" / "manifest.json").unlink()
    with pytest.raises(DriverError, match="built by another version of remote-cli"):
        find_image(tmp_path)
