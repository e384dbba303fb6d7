"""WebSocket close codes, in one place: every module that sends, checks or
reports a close code takes it from here."""

from __future__ import annotations

# -- RFC 6455 section 7.4.1, and the IANA "WebSocket Close Code Number" registry
NORMAL = 1000
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
UNSUPPORTED_DATA = 1003
NO_STATUS = 1005  # local only: the close frame carried no code
ABNORMAL = 1006  # local only: the connection ended without a close frame
INVALID_DATA = 1007
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
MANDATORY_EXTENSION = 1010
INTERNAL_ERROR = 1011
SERVICE_RESTART = 1012  # IANA registry (not in the RFC's list)
TRY_AGAIN_LATER = 1013  # IANA registry
BAD_GATEWAY = 1014  # IANA registry
TLS_HANDSHAKE = 1015  # local only

# Codes a peer may put in a close frame (7.4.1, 7.4.2): 1004-1006 and 1015
# are reserved or for local use, never sent. 3000-4999 are also sendable.
SENDABLE = frozenset((
    NORMAL, GOING_AWAY, PROTOCOL_ERROR, UNSUPPORTED_DATA, INVALID_DATA, POLICY_VIOLATION,
    MESSAGE_TOO_BIG, MANDATORY_EXTENSION, INTERNAL_ERROR, SERVICE_RESTART, TRY_AGAIN_LATER, BAD_GATEWAY,
))
APPLICATION_RANGE = range(3000, 5000)

# -- Hocuspocus (the CloseEvents of @hocuspocus/common): codes in the
# private-use range 4000-4999 that its provider understands. It also sends
# MESSAGE_TOO_BIG (1009) above.
RESET_CONNECTION = 4205
UNAUTHORIZED = 4401
FORBIDDEN = 4403
CONNECTION_TIMEOUT = 4408
