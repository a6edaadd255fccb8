"""
One loopback port in each of many network namespaces, all forwarded to one
broker: C{python -m lab.nsforward --target 127.0.0.1:5672 NS:PORT...}.

The lifecycle tests and C{make scale} give every tenant network a namespace
of its own, but one tenant RabbitMQ (a vhost per link) to save memory.  This
process runs in the broker's namespace; for each C{NS:PORT} it enters the
namespace just long enough to bind C{127.0.0.1:PORT} there, then forwards
every connection on it to C{--target} in its own namespace.  A socket keeps
the namespace it was made in, so one reactor serves all of them, and all
traffic stays on loopback addresses.  It prints C{ready} once every port
listens.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Any

from twisted.internet import task
from twisted.protocols.portforward import ProxyFactory

from msgmux.tenantchild import enter_namespace


def bind_in_namespace(namespace: str, port: int, home: str) -> socket.socket:
    """A listening socket on 127.0.0.1:C{port} inside C{namespace}."""
    enter_namespace(f"/run/netns/{namespace}")
    try:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        listener.setblocking(False)
        return listener
    finally:
        enter_namespace(home)


def main(reactor: Any, arguments: argparse.Namespace) -> Any:
    host, _, port = arguments.target.rpartition(":")
    home = f"/proc/{os.getpid()}/ns/net"
    home_fd_path = f"/proc/self/fd/{os.open(home, os.O_RDONLY)}"
    factory = ProxyFactory(host, int(port))
    factory.noisy = False
    for item in arguments.listen:
        namespace, _, listen_port = item.rpartition(":")
        listener = bind_in_namespace(namespace, int(listen_port), home_fd_path)
        reactor.adoptStreamPort(listener.fileno(), socket.AF_INET, factory)
        listener.close()
    print("ready", flush=True)
    return task.Deferred()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to, in this process's namespace")
    parser.add_argument("listen", nargs="+", help="NAMESPACE:PORT to listen on")
    task.react(main, [parser.parse_args(sys.argv[1:])])
