"""The `meshling demo`: a sample topology of services, each behind a standalone proxy.

Two small services (`web`, and `api` in two versions) run as child processes, each
next to its own `meshling proxy run` from a generated snapshot file; a traffic loop
drives requests through the mesh (web -> web's proxy -> api's proxy -> api) and a
summary table read from every proxy's `/metrics` is printed as it runs.
"""
