"""Fixtures shared by the network tests."""

from tests.support.scp_node import make_node  # noqa: F401  (fixture)
