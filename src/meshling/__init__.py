"""meshling: a lightweight service mesh with a fast Python proxy."""

__version__ = "0.1.0"
