"""Models written by hand, the way tutorials write them, for the patch tests."""
