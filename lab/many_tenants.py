"""
Many tenant halves in one process: C{python -m lab.many_tenants CONFIG...}.

For the many-links test and benchmark only: a real deployment runs one
tenant half per tenant network (namespace).  Each config gets its own
L{msgmux.service.TenantHalf}, with its own broker connection and link.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import defer, task

from msgmux.config import load
from msgmux.service import TenantHalf


def main(reactor: Any, paths: list[str]) -> defer.Deferred[None]:
    halves = [TenantHalf(load(path).tenant, reactor) for path in paths]  # type: ignore[arg-type]
    for half in halves:
        half.start()
    print(f"started {len(halves)} tenant halves", flush=True)
    done: defer.Deferred[None] = defer.Deferred()
    reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.DeferredList([defer.Deferred.fromCoroutine(h.stop()) for h in halves]))
    return done


if __name__ == "__main__":
    task.react(main, [sys.argv[1:]])
