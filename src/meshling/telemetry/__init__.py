"""Metrics and access logs of the proxy."""
