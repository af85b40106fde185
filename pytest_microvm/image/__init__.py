"""The guest image: what the microVM boots. Built on the user's machine from the agent
source shipped in the package, a distribution kernel and busybox."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["GuestImage", "build_agent", "build_image"]


def __getattr__(name: str) -> Any:
    # Imported on first use: the pytest header and the VM options name the image without
    # loading its builder.
    if name in __all__:
        from pytest_microvm.image import builder

        return getattr(builder, name)
    raise AttributeError(f"module 'pytest_microvm.image' has no attribute {name!r}")


if TYPE_CHECKING:
    from pytest_microvm.image.builder import GuestImage, build_agent, build_image
