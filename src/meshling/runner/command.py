"""`meshling run [proxy options] -- APP ARGS...`: the command's options, checked, then run.

Exit codes: the app's own (128+N when signal N ended it); 2 for options or files that
cannot work (nothing is started); those of `lifecycle` (70, 71, 72, 126, 127) when the
proxy or the app could not do their part.
"""

from __future__ import annotations

import argparse
import os
import sys

USAGE_ERROR = 2


def run(args: argparse.Namespace) -> int:
    from meshling.runner.plan import PlanError, resolve

    app = list(args.app)
    if app and app[0] == "--":
        app = app[1:]
    problem = None
    if not app:
        problem = "give the app's command after --, e.g. meshling run --config FILE -- ./job"
    for option in ("ready_timeout", "drain_timeout", "app_grace"):
        if not getattr(args, option) > 0:
            problem = f"--{option.replace('_', '-')}: must be a positive number of seconds"
    if problem is None:
        try:
            plan = resolve(
                config=args.config,
                cp=args.cp,
                token_file=args.token_file,
                dataplane=args.dataplane,
                data_dir=args.data_dir,
                cp_ca_file=args.cp_ca_file,
                environ=os.environ,
            )
        except PlanError as exc:
            problem = str(exc)
    if problem is not None:
        print(f"meshling run: {problem}", file=sys.stderr)
        return USAGE_ERROR
    from meshling.runner.supervise import Supervisor, run

    return run(
        Supervisor(
            plan,
            app,
            ready_timeout=args.ready_timeout,
            drain_timeout=args.drain_timeout,
            app_grace=args.app_grace,
            log_level=args.log_level,
            proxy_log=args.proxy_log,
        )
    )
