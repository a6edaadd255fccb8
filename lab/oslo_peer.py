"""
An oslo.messaging peer driven over stdin/stdout, for tests, the demo and the
benchmarks.

Run it where the broker is (inside the tenant network namespace for the
tenant broker): C{python -m lab.oslo_peer URL}.  It reads one JSON command per
line and answers each with one JSON line carrying the same C{"id"}; commands
run in threads, so a slow call does not hold up the others.  Nothing here is
msgmux: it is plain, unmodified oslo.messaging with a private ConfigOpts.

Commands (C{op}):
 - C{server}: start an RPC server (C{name}, C{topic}, C{server}, C{exchange})
   whose endpoint records every request it serves;
 - C{stop}: stop a server or listener by C{name};
 - C{call}/C{cast}: RPC from a client (C{topic}, C{server}, C{fanout},
   C{method}, C{kwargs}, C{context}, C{timeout}, C{call_monitor_timeout});
 - C{calls}: C{count} calls over C{threads} threads, returning latencies;
 - C{casts}: C{count} casts as fast as possible;
 - C{listener}: a notification listener (C{name}, C{topics}, C{pool},
   C{exchange}) recording what it gets; C{notify}: send one notification;
 - C{received}: what a server or listener recorded (C{name});
 - C{quit}.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import futurist._thread
import oslo_messaging as om
from oslo_config import cfg
from oslo_messaging import transport as om_transport
from oslo_messaging._drivers import amqp as om_amqp
from oslo_messaging._drivers import impl_rabbit
from oslo_messaging._metrics import client as om_metrics
from oslo_messaging._tracing import client as om_tracing

# Worker threads otherwise poll for work once a second, which makes every
# server stop take a second.
futurist._thread.ThreadWorker.MAX_IDLE_FOR = 0.05


class DuplicateCounter(logging.Handler):
    """Counts oslo's "duplicate message" reports: duplicates it filtered out."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "duplicate message" in text:
            self.count += 1


DUPLICATES = DuplicateCounter()
logging.getLogger("oslo_messaging").addHandler(DUPLICATES)
logging.getLogger("oslo_messaging").setLevel(logging.INFO)


class PeerError(Exception):
    """A custom remote exception: travels with its kwargs to allowed callers."""

    def __init__(self, message: str = "peer error", code: int = 0) -> None:
        self.kwargs = {"code": code}
        super().__init__(message)


def make_conf(exchange: str, rabbit: dict[str, Any]) -> cfg.ConfigOpts:
    """A private ConfigOpts with the groups oslo.messaging needs registered."""
    conf = cfg.ConfigOpts()
    conf.register_opts(om_tracing.oslo_messaging_tracing, group="oslo_messaging_tracing")
    conf.register_opts(om_metrics.oslo_messaging_metrics, group="oslo_messaging_metrics")
    conf.register_opts(om_transport._transport_opts)
    conf.register_opts(impl_rabbit.rabbit_opts, group="oslo_messaging_rabbit")
    conf.register_opts(om_amqp.amqp_opts, group="oslo_messaging_rabbit")
    conf([], project="msgmux-lab", default_config_files=[], default_config_dirs=[])
    conf.set_override("control_exchange", exchange)
    conf.set_override("heartbeat_rate", 60, group="oslo_messaging_rabbit")
    for key, value in rabbit.items():
        conf.set_override(key, value, group="oslo_messaging_rabbit")
    return conf


class RecordingEndpoint:
    """What every lab RPC server serves."""

    target = om.Target(version="1.0")

    def __init__(self, name: str) -> None:
        self.name = name
        self.received: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def _record(self, ctxt: dict[str, Any], method: str, kwargs: dict[str, Any]) -> None:
        with self.lock:
            self.received.append({"method": method, "kwargs": kwargs, "context": ctxt, "at": time.time()})

    def echo(self, ctxt: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        self._record(ctxt, "echo", kwargs)
        return {"server": self.name, "kwargs": kwargs, "context": ctxt}

    def report_state(self, ctxt: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        self._record(ctxt, "report_state", kwargs)
        return {"server": self.name, "state": "ok"}

    def forbidden(self, ctxt: dict[str, Any], **kwargs: Any) -> str:
        self._record(ctxt, "forbidden", kwargs)
        return "you should not see this"

    def sleep(self, ctxt: dict[str, Any], seconds: float) -> float:
        self._record(ctxt, "sleep", {"seconds": seconds})
        time.sleep(seconds)
        return seconds

    def boom(self, ctxt: dict[str, Any]) -> None:
        self._record(ctxt, "boom", {})
        raise ValueError("boom from " + self.name)

    def custom(self, ctxt: dict[str, Any], code: int = 7) -> None:
        self._record(ctxt, "custom", {"code": code})
        raise PeerError("custom failure", code=code)


class RecordingNotifications:
    """Notification endpoint for every priority, recording what arrives."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        for priority in ("audit", "debug", "info", "warn", "error", "critical", "sample"):
            setattr(self, priority, self._recorder(priority))

    def _recorder(self, priority: str) -> Any:
        def record(ctxt: Any, publisher_id: str, event_type: str, payload: Any, metadata: Any) -> None:
            with self.lock:
                self.received.append(
                    {
                        "priority": priority,
                        "publisher_id": publisher_id,
                        "event_type": event_type,
                        "payload": payload,
                        "at": time.time(),
                    }
                )

        return record


class Peer:
    def __init__(self, url: str, exchange: str, rabbit: dict[str, Any]) -> None:
        self.url = url
        self.conf = make_conf(exchange, rabbit)
        self.rpc = om.get_rpc_transport(self.conf, url=url, allowed_remote_exmods=[__name__, "lab.oslo_peer"])
        self.notifications = om.get_notification_transport(self.conf, url=url)
        self.servers: dict[str, Any] = {}
        self.endpoints: dict[str, Any] = {}
        self.out_lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=64)

    def reply(self, message: dict[str, Any]) -> None:
        line = json.dumps(message, default=repr)
        with self.out_lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def client(self, command: dict[str, Any]) -> Any:
        target = om.Target(topic=command["topic"], exchange=command.get("exchange"))
        client = om.get_rpc_client(self.rpc, target, timeout=command.get("timeout", 30))
        options: dict[str, Any] = {}
        if command.get("server"):
            options["server"] = command["server"]
        if command.get("fanout"):
            options["fanout"] = True
        if command.get("call_monitor_timeout"):
            options["call_monitor_timeout"] = command["call_monitor_timeout"]
        return client.prepare(**options) if options else client

    def op_server(self, command: dict[str, Any]) -> str:
        name = command["name"]
        endpoint = RecordingEndpoint(name)
        target = om.Target(topic=command["topic"], server=command.get("server") or name, exchange=command.get("exchange"))
        server = om.get_rpc_server(self.rpc, target, [endpoint], executor="threading")
        server.start()
        self.servers[name] = server
        self.endpoints[name] = endpoint
        return name

    def op_listener(self, command: dict[str, Any]) -> str:
        name = command["name"]
        endpoint = RecordingNotifications()
        targets = [om.Target(topic=topic, exchange=command.get("exchange")) for topic in command["topics"]]
        listener = om.get_notification_listener(
            self.notifications, targets, [endpoint], executor="threading", pool=command.get("pool")
        )
        listener.start()
        self.servers[name] = listener
        self.endpoints[name] = endpoint
        return name

    def op_stop(self, command: dict[str, Any]) -> str:
        server = self.servers.pop(command["name"])
        server.stop()
        server.wait()
        return command["name"]

    def op_received(self, command: dict[str, Any]) -> list[dict[str, Any]]:
        endpoint = self.endpoints[command["name"]]
        with endpoint.lock:
            return list(endpoint.received)

    def op_call(self, command: dict[str, Any]) -> Any:
        return self.client(command).call(command.get("context", {}), command["method"], **command.get("kwargs", {}))

    def op_cast(self, command: dict[str, Any]) -> None:
        self.client(command).cast(command.get("context", {}), command["method"], **command.get("kwargs", {}))

    def op_casts(self, command: dict[str, Any]) -> float:
        client = self.client(command)
        started = time.perf_counter()
        for index in range(command["count"]):
            client.cast({}, command["method"], i=index, **command.get("kwargs", {}))
        return time.perf_counter() - started

    def op_calls(self, command: dict[str, Any]) -> dict[str, Any]:
        """Many calls over several threads; returns latencies and errors."""
        client = self.client(command)
        count, threads = command["count"], command.get("threads", 1)
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        counter = iter(range(count))

        def worker() -> None:
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                started = time.perf_counter()
                try:
                    result = client.call({"n": index}, command.get("method", "echo"), i=index, **command.get("kwargs", {}))
                    if command.get("check", True) and result["kwargs"]["i"] != index:
                        raise AssertionError(f"reply {result} is not for call {index}")
                except Exception as e:
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                    continue
                with lock:
                    latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        workers = [threading.Thread(target=worker) for _ in range(threads)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        return {"elapsed": time.perf_counter() - started, "latencies": latencies, "errors": errors}

    def op_duplicates(self, command: dict[str, Any]) -> int:
        """How many duplicates oslo's own _unique_id check dropped so far."""
        return DUPLICATES.count

    def op_load(self, command: dict[str, Any]) -> list[list[Any]]:
        """
        Steady load for fault injection: C{count} casts (or notifications,
        or calls) with ids 0..count-1 at C{rate} per second.  @return:
        C{[id, ok, sent_at, error]} per message.
        """
        kind, count, rate = command["kind"], command["count"], command["rate"]
        first = command.get("first", 0)  # ids first..first+count-1, so that rounds of load can be told apart
        client = self.client(command) if kind in ("cast", "call") else None
        notifier = None
        if kind == "notify":
            notifier = om.Notifier(self.notifications, publisher_id="lab.load", driver="messagingv2", topics=[command["topic"]])
        results: list[list[Any]] = []
        started = time.monotonic()
        for index in range(first, first + count):
            delay = started + (index - first) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sent_at = time.time()
            try:
                if kind == "cast":
                    client.cast({}, command.get("method", "echo"), i=index)  # type: ignore[union-attr]
                elif kind == "call":
                    client.call({}, command.get("method", "echo"), i=index)  # type: ignore[union-attr]
                else:
                    notifier.info({}, "load.event", {"i": index})  # type: ignore[union-attr]
                results.append([index, True, sent_at, None])
            except Exception as e:
                results.append([index, False, sent_at, type(e).__name__])
        return results

    def op_notify(self, command: dict[str, Any]) -> None:
        notifier = om.Notifier(
            self.notifications,
            publisher_id=command.get("publisher_id", "lab.host"),
            driver="messagingv2",
            topics=[command["topic"]],
        )
        getattr(notifier, command["priority"])(command.get("context", {}), command["event_type"], command["payload"])

    def handle(self, command: dict[str, Any]) -> None:
        request = command.get("id")
        try:
            result = getattr(self, "op_" + command["op"])(command)
        except Exception as e:
            self.reply(
                {
                    "id": request,
                    "ok": False,
                    "error": type(e).__name__,
                    "message": str(e)[:2000],
                    "kwargs": getattr(e, "kwargs", None),
                    "traceback": traceback.format_exc()[-2000:] if command.get("traceback") else None,
                }
            )
        else:
            self.reply({"id": request, "ok": True, "result": result})

    def shutdown(self) -> None:
        servers = list(self.servers.values())
        stoppers = [threading.Thread(target=server.stop) for server in servers]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()
        for server in servers:
            server.wait()
        self.rpc.cleanup()
        self.notifications.cleanup()


def main() -> None:
    url = sys.argv[1]
    exchange = sys.argv[2] if len(sys.argv) > 2 else "openstack"
    rabbit = json.loads(os.environ.get("LAB_OSLO_RABBIT", "{}"))
    peer = Peer(url, exchange, rabbit)
    peer.reply({"id": None, "ok": True, "result": "ready", "pid": os.getpid()})
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        command = json.loads(line)
        if command["op"] == "quit":
            peer.shutdown()
            peer.reply({"id": command.get("id"), "ok": True, "result": "bye"})
            break
        if command["op"] in ("server", "listener", "stop"):
            peer.handle(command)  # in order, so later commands see them
        else:
            peer.pool.submit(peer.handle, command)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
