"""QEMU's machine protocol monitor (QMP), served by every migfd VM process.

:class:`QMPServer` listens on a UNIX socket and runs one :class:`QMPSession`
per client; :mod:`migfd.qmp.json_stream` cuts the clients' input into requests.
A command fails by raising :class:`migfd.errors.QMPError`.
"""

from migfd.qmp.server import MAX_REQUEST_BYTES, QMPServer
from migfd.qmp.session import MAX_PENDING_FDS, PeerCredentials, QMPSession

__all__ = ["MAX_PENDING_FDS", "MAX_REQUEST_BYTES", "PeerCredentials", "QMPServer", "QMPSession"]
