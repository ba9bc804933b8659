"""Admin listener of the proxy."""
