"""Transparent proxying: capture rules that hand an app's traffic to its proxy, and the
proxy's side of it (the original destination of a redirected connection, the chain it
picks, and passthrough for destinations outside the mesh).

The rules (`rules`, `iptables`, `cli`) are for `meshling transparent install|uninstall`;
the rest is loaded by the proxy only when a snapshot has a transparent listener.
"""
