"""torchrun for the launcher's single-node jobs, with every rendezvous store listening on loopback only.

`python -m sae_core.engine.torchrun ARGS` is `python -m torch.distributed.run ARGS`, except that the TCP
stores torchrun's agent hosts (the c10d rendezvous store and the workers' store) are bound to 127.0.0.1:
torch binds them to every interface, which on a shared workstation opens two unauthenticated ports to the
network for every job. The launcher also passes `--rdzv-endpoint 127.0.0.1:0 --local-addr 127.0.0.1` and
points gloo and NCCL at the loopback interface. Multi-node runs use plain torchrun (see README).
"""

from __future__ import annotations

import socket
import sys

import torch.distributed as dist
import torch.distributed.elastic.rendezvous.c10d_rendezvous_backend as c10d_backend
from torch.distributed.run import main as torchrun_main

LOOPBACK = "127.0.0.1"
_tcp_store = dist.TCPStore


def loopback_tcp_store(host_name, port, world_size=None, is_master: bool = False, **kwargs):
    """A TCPStore whose server, when this process hosts it, listens on a socket bound to loopback."""
    if is_master and kwargs.get("master_listen_fd") is None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, port))
        listener.listen(128)
        port = listener.getsockname()[1]  # port 0 asks for a free one: the store must report the real one
        kwargs["master_listen_fd"] = listener.detach()
    return _tcp_store(host_name, port, world_size, is_master, **kwargs)


def main(argv: list[str] | None = None) -> None:
    # Both places the agent builds its stores from: the c10d backend imported the class by name.
    dist.TCPStore = loopback_tcp_store  # type: ignore[misc,assignment]
    c10d_backend.TCPStore = loopback_tcp_store  # type: ignore[misc,assignment]
    torchrun_main(argv)


if __name__ == "__main__":
    main()
    sys.exit(0)
