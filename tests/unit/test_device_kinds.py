"""Device kinds register themselves: the command line finds each by option group and driver."""

from __future__ import annotations

import pytest

from migfd.devices import DEVICE_KINDS, ChardevSocket, MemoryBackendMemfd, TapNetdev, from_options
from migfd.devices.base import Device, register_device
from migfd.errors import MigrationError

pytestmark = pytest.mark.unit


def test_the_three_backends_are_registered_under_their_qemu_names():
    assert DEVICE_KINDS[("object", "memory-backend-memfd")] is MemoryBackendMemfd
    assert DEVICE_KINDS[("netdev", "tap")] is TapNetdev
    assert DEVICE_KINDS[("chardev", "socket")] is ChardevSocket


@pytest.fixture
def pipe_kind():
    """A device kind of this test's own, registered as a module of migfd.devices would be."""
    @register_device
    class ChardevPipe(Device):
        group = "chardev"
        kind = "x-test-pipe"

        @classmethod
        def from_opts(cls, id, opts, backend_transfer):
            dev = cls(id, backend_transfer)
            dev.path = opts.pop("path")
            return dev

    yield ChardevPipe
    del DEVICE_KINDS[("chardev", "x-test-pipe")]


def test_a_new_kind_is_built_from_its_options_once_registered(pipe_kind):
    dev = from_options("chardev", "x-test-pipe,id=p0,path=/tmp/p,backend-transfer=on")
    assert type(dev) is pipe_kind and dev.id == "p0" and dev.path == "/tmp/p" and dev.backend_transfer
    with pytest.raises(MigrationError, match="unknown option 'mode'"):
        from_options("chardev", "x-test-pipe,id=p0,path=/tmp/p,mode=0600")
    with pytest.raises(MigrationError, match="-netdev x-test-pipe is not supported"):
        from_options("netdev", "x-test-pipe,id=p0,path=/tmp/p")


def test_two_kinds_cannot_share_a_name(pipe_kind):
    with pytest.raises(TypeError, match="registered twice"):
        @register_device
        class Other(Device):
            group = "chardev"
            kind = "x-test-pipe"
