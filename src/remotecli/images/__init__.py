"""The microVM guest image: a Debian 12 root filesystem, a PVH-bootable kernel and an initrd.

``remotecli image build`` calls :func:`build_image`; the QEMU driver calls :func:`find_image`.
"""

from __future__ import annotations

from remotecli.images.build import GuestImage, build_image, default_cache_dir, find_image

__all__ = ["GuestImage", "build_image", "default_cache_dir", "find_image"]
