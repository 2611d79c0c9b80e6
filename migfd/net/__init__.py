"""Host networking for migfd's TAP backends: the /dev/net/tun ioctls (:mod:`~migfd.net.tun`),
links and network namespaces (:mod:`~migfd.net.netns`), and the Ethernet frames the guest
answers (:mod:`~migfd.net.ethernet`).

Import from the submodules (``from migfd.net import tun``); this package re-exports nothing.
"""
