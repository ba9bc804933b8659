"""Mesh DNS: stable virtual IPs for services, and the proxy's small DNS responder."""
