"""`meshling run`: an app started after its proxy is ready, and the proxy drained after it.

* `lifecycle`: the decisions (start the app, forward a signal, drain, kill, exit code) as
  a pure state machine of events and the time, without processes;
* `plan`: which proxy to start, where its admin listener answers, and what the app is told
  about the mesh (environment variables), from the same options as `meshling proxy run`;
* `supervise`: the thin layer that runs the two child processes and feeds the machine.
"""
