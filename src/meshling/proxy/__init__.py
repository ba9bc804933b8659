"""The data plane: listeners, HTTP and TCP proxying, clusters."""
