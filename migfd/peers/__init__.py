"""What drives and observes VMs from outside, as tests, benchmarks and notebooks use it.

:mod:`~migfd.peers.process` starts ``migfd vm`` processes (and, in
:mod:`~migfd.peers.qemu`, real QEMU) and drives them over QMP;
:mod:`~migfd.peers.migrate` runs one migration between two of them and
:mod:`~migfd.peers.demo` the protocol tour's live one; :mod:`~migfd.peers.frames`
and :mod:`~migfd.peers.chardev` are the traffic peers that count what a
migration lost; :mod:`~migfd.peers.tapnet` sets up a TAP inside a network
namespace for them. Import from the submodules.
"""
