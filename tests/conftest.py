"""Shared pytest fixtures (fixtures only)."""

from __future__ import annotations

import pytest

from peerd.errors import TransportUnavailable
from peerd.transport import TRANSPORTS, Transport, get_transport


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> Transport:
    """Each transport backend in turn ("reactor", "proactor").

    A backend that cannot run on this machine (io_uring disabled, liburing
    missing) is skipped with the one-line reason get_transport gives.
    """
    try:
        return get_transport(request.param)
    except TransportUnavailable as exc:
        pytest.skip(str(exc))
