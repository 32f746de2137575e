"""Comparing pytrees of arrays in tests (same structure, every leaf close), shared by several test files."""
import chex


def assert_trees_close(a, b, rtol=2e-5, atol=2e-5):
    """Same tree structure, and every leaf of ``a`` allclose to ``b``'s; a failure names the leaf's path (chex's check:
    unlike a ``zip`` over the leaves, a missing or extra leaf fails instead of being skipped)."""
    chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)
