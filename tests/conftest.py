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


# Modules whose tests start real tracker and peer processes and wait on them:
# collected first, so that with several workers (scripts/test) the long ones
# start early and the many short in-process tests fill the gaps at the end.
_PROCESS_MODULES = (
    "test_reliability_network",
    "test_reliability_crashes",
    "test_reliability_environment",
    "test_hostile_network",
    "test_reliability_hostile_peers",
    "test_e2e",
    "test_daemon",
    "test_reliability_manifests",
    "test_hostile_tracker",
    "test_emulation",
    "test_node_upload_turns",
    "test_local_robustness",
    "test_session_deadlines",
    "test_tracker",
    "test_bench_scripts",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        module = item.path.stem
        return (
            _PROCESS_MODULES.index(module) if module in _PROCESS_MODULES else len(_PROCESS_MODULES)
        )

    items.sort(key=rank)  # stable: the order within a module is kept
