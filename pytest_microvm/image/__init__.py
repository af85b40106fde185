"""The guest image: what the microVM boots. Built on the user's machine from the agent
source shipped in the package, a distribution kernel and busybox."""

from pytest_microvm.image.builder import GuestImage, build_agent, build_image

__all__ = ["GuestImage", "build_agent", "build_image"]
