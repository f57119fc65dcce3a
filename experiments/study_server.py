"""Serve a study's storage to many sweep workers over gRPC (Optuna's storage proxy).

  python -m experiments.study_server --storage postgresql://user@db-host/optuna --port 13000
  python -m experiments.sweep conv_bn --storage grpc://server-host:13000   # on every worker

One process holds the database connections; the workers, however many, talk to it. The proxy
keeps no heartbeats: each worker records one as a trial attribute (mnist_jax/sweep.py, BEAT),
and a trial without one for 2 x --heartbeat seconds is failed and run again from its checkpoint
by the next worker that looks. The server has no login and no TLS: it listens on loopback
unless given --host; give it a private network's address only (docs/design.md).
"""

import argparse
import os
from concurrent.futures import ThreadPoolExecutor

import optuna

from mnist_jax import flags
from mnist_jax import sweep as sweep_lib
from mnist_jax.config import ConfigError


def main(argv=None) -> None:
    p = flags.Parser(prog="python -m experiments.study_server", description=__doc__.splitlines()[0],
                     epilog="\n".join(__doc__.splitlines()[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--storage", required=True, help="the study's RDB URL (postgresql://..., sqlite:///PATH)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default %(default)s: this machine only)")  # fmt: skip
    p.add_argument("--port", type=int, default=13000, help="(default %(default)s)")
    args = p.parse_args(argv)
    with flags.user_errors(ConfigError):
        if not 0 < args.port < 65536:
            raise ConfigError(f"--port: a port number, 1-65535, got {args.port}")
        try:
            storage = sweep_lib.rdb(args.storage)
        except Exception as e:  # sqlalchemy's
            raise sweep_lib.cannot_open(args.storage, e) from None
        server = serve(optuna.storages.get_storage(storage), args.host, args.port)  # get_storage: cached
        print(f"serving {sweep_lib.shown(args.storage)} on grpc://{args.host}:{args.port}; Ctrl-C stops", flush=True)  # fmt: skip
        try:
            server.wait_for_termination()
        except KeyboardInterrupt:
            flags.fail("stopped (SIGINT)", 130)


def serve(storage, host: str, port: int):
    """Optuna's storage proxy (what optuna.storages.run_grpc_proxy_server starts), started, on a
    port no other server shares: gRPC's default lets a second server bind it too, and clients
    would be split between them."""
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # its own log of a failed bind: ours is one line
    import grpc
    from optuna.storages._grpc import servicer
    from optuna.storages._grpc.auto_generated import api_pb2_grpc

    server = grpc.server(ThreadPoolExecutor(max_workers=10), options=[("grpc.so_reuseport", 0)])
    api_pb2_grpc.add_StorageServiceServicer_to_server(servicer.OptunaStorageProxyService(storage), server)
    try:
        server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as e:  # the port is taken, or the address is not this machine's
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e})") from None
    server.start()
    return server


if __name__ == "__main__":
    main()
