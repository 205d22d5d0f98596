"""`switchboard serve-ray`: the settings of `switchboard serve` plus where and how many replicas.

Ray is imported only when the command runs, so the rest of the CLI works without the `ray` extra.
"""

from __future__ import annotations

import argparse
import sys

from server.settings import Settings


def add_ray_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("ray serve")
    g.add_argument("--replicas", type=int, default=1, help="fixed number of replicas (default 1)")
    g.add_argument("--min-replicas", type=int, default=None, help="autoscale: fewest replicas (turns autoscaling on)")
    g.add_argument("--max-replicas", type=int, default=None, help="autoscale: most replicas (turns autoscaling on)")
    g.add_argument("--target-ongoing-requests", type=float, default=8.0,
                   help="autoscale: ongoing requests per replica Ray Serve aims for (default 8)")
    g.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs reserved per replica (default 1)")
    g.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs reserved per replica (default 0; 1 with --device cuda)")
    g.add_argument("--ray-address", default=None,
                   help="an existing cluster (`auto`, or ray://host:10001); default: start a local one")


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        sys.stderr.write("switchboard serve-ray needs Ray Serve: pip install 'lora-switchboard[ray]'\n")
        return 2
    from server.commands.ray_serve import build_app

    gpus = args.replica_gpus or (1.0 if settings.model.device == "cuda" else 0.0)
    autoscale = args.min_replicas is not None or args.max_replicas is not None
    if args.ray_address:
        ray.init(address=args.ray_address)
    else:
        ray.init(include_dashboard=False)
    serve.start(http_options={"host": settings.server.host, "port": settings.server.port})
    app = build_app(settings, replicas=None if autoscale else args.replicas, min_replicas=args.min_replicas,
                    max_replicas=args.max_replicas, target_ongoing_requests=args.target_ongoing_requests,
                    num_cpus=args.replica_cpus, num_gpus=gpus)
    serve.run(app, name="switchboard", route_prefix="/", blocking=True)
    return 0
