"""A vhost-user-vsock backend in Python: guests get real AF_VSOCK without /dev/vhost-vsock.

QEMU's ``vhost-user-vsock-pci`` device hands the virtqueues to this process over a Unix
socket; it maps guest RAM (shared memfd), runs the rings, and maps guest connections to
host Unix sockets the way Firecracker's hybrid vsock does. Standard library only.

- :mod:`.messages`: the vhost-user wire format
- :mod:`.memory`: guest RAM mapping and address translation
- :mod:`.virtqueue`: split virtqueues
- :mod:`.vsock`: vsock packets, connections, credit, the muxer
- :mod:`.backend`: the control socket and the event loop
- :mod:`.forkserver`: one interpreter per host process that forks a backend per VM
- ``python -m pytest_microvm.channel.vhost_user``: a backend in an interpreter of its own

Nothing is imported here: the harness reads :mod:`.forkserver`'s constants without
loading the backend.
"""
