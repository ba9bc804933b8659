"""The control plane: resources, and the per-proxy snapshots built from them."""
