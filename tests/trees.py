"""Comparing pytrees of arrays in tests (same structure, every leaf close), shared by several test files."""
import jax
import numpy as np


def assert_trees_close(a, b, rtol=2e-5, atol=2e-5):
    """Same tree structure, and every leaf of ``a`` allclose to ``b``'s; a failure names the leaf's path."""
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for (path, va), vb in zip(flat_a, flat_b):
        np.testing.assert_allclose(va, vb, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))
