# -*- test-case-name: tests.test_scripted_service -*-
"""
L{BrokerService} as msgmux builds it, on a memory reactor whose TCP
connections iosim completes to L{ScriptedBroker}s listening there: it logs
in, tells its observers, reconnects after a loss, and fails over to the next
host when one refuses the login; and the whole of msgmux, both halves and
the link between them, coming up that way.  No injection point beyond the
C{reactor} msgmux already passes: HostnameEndpoint connects through
C{MemoryReactorClock.connectTCP} (the link through C{connectUNIX}), and
L{connect_pending} completes it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from msgmux.amqp.broker import BrokerService
from msgmux.amqp.protocol import BrokerProtocol
from msgmux.config import BrokerConfig, parse_transport_url
from msgmux.tap import Options, makeService
from tests.doubles.amqp import ScriptedBrokerFactory, connect_pending


class RecordingObserver:
    """A L{BrokerObserver} that keeps what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def broker_connected(self, protocol: BrokerProtocol) -> None:
        self.events.append(("connected", protocol))

    def broker_lost(self, reason: Failure) -> None:
        self.events.append(("lost", reason))


class BrokerServiceTests(SynchronousTestCase):
    """
    L{BrokerService} as msgmux runs it, on a memory reactor whose TCP
    connections iosim completes to scripted brokers listening there.
    """

    def service(self, url: str) -> tuple[MemoryReactorClock, BrokerService, RecordingObserver]:
        reactor = MemoryReactorClock()
        hosts, vhost = parse_transport_url(url)
        config = BrokerConfig(hosts=hosts, virtual_host=vhost, exchange="openstack", heartbeat=10)
        service = BrokerService(config, "control", reactor, retry_policy=lambda attempt: 1.0)
        observer = RecordingObserver()
        service.add_observer(observer)
        return reactor, service, observer

    def test_login_and_reconnect(self) -> None:
        """The service logs in, tells its observers, hears of the loss, and logs in again."""
        reactor, service, observer = self.service("rabbit://guest:secret@127.0.0.1:5672/tenant-a")
        brokers = ScriptedBrokerFactory(clock=reactor)
        reactor.listenTCP(5672, brokers, interface="127.0.0.1")
        service.startService()
        reactor.advance(0)
        [pump] = connect_pending(reactor)
        pump.flush()
        [broker] = brokers.brokers
        self.assertEqual((broker.vhost, broker.username, broker.password), ("tenant-a", "guest", "secret"))
        self.assertEqual(broker.heartbeat, 10)
        self.assertEqual(observer.events, [("connected", service.protocol)])
        self.assertEqual(service.display, "127.0.0.1:5672")

        broker.drop()
        pump.flush()
        self.assertIsNone(service.protocol)
        self.assertEqual([event for event, _ in observer.events], ["connected", "lost"])
        reactor.advance(1.0)
        [pump] = connect_pending(reactor)
        pump.flush()
        self.assertEqual(len(brokers.brokers), 2)
        self.assertEqual([event for event, _ in observer.events], ["connected", "lost", "connected"])
        self.assertIs(observer.events[-1][1], service.protocol)
        stopping = service.stopService()
        pump.flush()
        self.successResultOf(stopping)
        self.assertIsNotNone(brokers.brokers[1].lost)

    def test_refused_login_fails_over(self) -> None:
        """A host that refuses the login (403) counts as a failed attempt: the next host is tried, and used."""
        reactor, service, observer = self.service("rabbit://guest:secret@127.0.0.1:5672,127.0.0.1:5673/")
        refusing = ScriptedBrokerFactory(credentials=("guest", "other"))
        accepting = ScriptedBrokerFactory(credentials=("guest", "secret"))
        reactor.listenTCP(5672, refusing, interface="127.0.0.1")
        reactor.listenTCP(5673, accepting, interface="127.0.0.1")
        service.startService()
        reactor.advance(0)
        [pump] = connect_pending(reactor)
        pump.flush()
        self.assertEqual(observer.events, [])
        self.assertIsNotNone(refusing.brokers[0].lost)
        reactor.advance(1.0)
        [pump] = connect_pending(reactor)
        pump.flush()
        self.assertEqual([event for event, _ in observer.events], ["connected"])
        self.assertEqual(accepting.brokers[0].vhost, "/")
        self.assertEqual(service.display, "127.0.0.1:5673")
        stopping = service.stopService()
        pump.flush()
        self.successResultOf(stopping)

    def test_rejected_connection_closes_quietly(self) -> None:
        """
        Closing a connection whose login failed raises nothing.

        BrokerService closes the connection it rejects (as it must, or a
        silent host would keep its socket), and Twisted's ClientService, by
        then waiting to retry, has no transition for a disconnect in that
        state: without L{msgmux.amqp.attempt} every refused login logged a
        critical NoTransition traceback.
        """
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        reactor, service, observer = self.service("rabbit://guest:secret@127.0.0.1:5672/")
        refusing = ScriptedBrokerFactory(credentials=("guest", "other"))
        reactor.listenTCP(5672, refusing, interface="127.0.0.1")
        service.startService()
        for attempt in (1, 2):
            reactor.advance(1.0)
            [pump] = connect_pending(reactor)
            pump.flush()
            self.assertEqual(len(refusing.brokers), attempt)
            self.assertIsNotNone(refusing.brokers[-1].lost)
        critical = [e for e in events if e.get("log_level") == LogLevel.critical]
        self.assertEqual(critical, [])
        self.assertEqual(observer.events, [])
        stopping = service.stopService()
        self.successResultOf(stopping)


BOTH_HALVES = """
[control]
transport_url = "rabbit://guest:guest@127.0.0.1:5672/control"
[[control.links]]
name = "tenant-a"
socket = "{socket}"
down = [ {{ topic = "l3_agent", fanout = true }} ]

[tenant]
transport_url = "rabbit://guest:guest@127.0.0.1:5672/tenant"
socket = "{socket}"
"""


OSLO_PROPERTIES = {
    "content_type": "application/json",
    "content_encoding": "utf-8",
    "headers": {},
    "delivery_mode": 2,
    "priority": 0,
}


class WholeServiceTests(SynchronousTestCase):
    """msgmux with both halves, built by makeService on a memory reactor, against scripted brokers."""

    def start(self) -> None:
        directory = tempfile.mkdtemp(prefix="msgmux-")  # short: a socket path has at most 107 bytes
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "msgmux.toml")
        with open(path, "w") as f:
            f.write(BOTH_HALVES.format(socket=os.path.join(directory, "tenant-a.sock")))
        options = Options()
        options.parseOptions(["--config", path])
        self.reactor = MemoryReactorClock()
        self.brokers = ScriptedBrokerFactory(clock=self.reactor, auto_confirm=True)
        self.reactor.listenTCP(5672, self.brokers, interface="127.0.0.1")
        self.service = makeService(options, self.reactor)
        self.service.startService()
        self.reactor.advance(0)
        self.pumps = connect_pending(self.reactor)
        self.assertEqual(len(self.pumps), 3)  # two brokers and the link
        self.flush()
        self.control, self.tenant = sorted(self.brokers.brokers, key=lambda broker: broker.vhost != "control")

    def flush(self) -> None:
        """Move bytes on every connection until all are quiet."""
        while any([pump.flush() for pump in self.pumps]):
            pass

    def settle(self) -> None:
        """Flush, let batched acknowledgements go out, flush again."""
        self.flush()
        self.reactor.advance(0.01)
        self.flush()

    def test_both_halves_come_up(self) -> None:
        """
        Both halves log in to their brokers, the link between them comes up
        over iosim, and each half declares and consumes, with nothing a
        scripted broker refuses; they stop cleanly.
        """
        self.start()
        self.assertEqual(self.reactor.unixClients, [])
        self.assertEqual((self.control.vhost, self.tenant.vhost), ("control", "tenant"))
        for broker in (self.control, self.tenant):
            self.assertEqual(broker.unexpected, [])
            self.assertTrue(broker.consumers)
            self.assertTrue(broker.methods("confirm.select"))
        self.assertIn("l3_agent", {consumer.queue for consumer in self.control.consumers.values()})
        stopping = self.service.stopService()
        for _ in range(100):  # the shutdown's own deadlines are shorter than 10 s
            self.flush()
            if stopping.called:
                break
            self.reactor.advance(0.1)
        self.successResultOf(stopping)
        self.assertEqual([broker.lost is not None for broker in self.brokers.brokers], [True, True])

    def test_cast_crosses(self) -> None:
        """
        A cast delivered on the control broker is published on the tenant
        broker, and acknowledged on the control broker once the tenant
        broker confirmed it.
        """
        self.start()
        self.tenant.auto_confirm = False
        inner = {"method": "router_updated", "args": {"router": "r1"}, "_unique_id": "u1", "version": "1.0"}
        body = json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps(inner)}).encode()
        tag = self.control.deliver("l3_agent", OSLO_PROPERTIES, body, exchange="openstack", routing_key="l3_agent")
        self.settle()
        [published] = [p for p in self.tenant.published if p.routing_key == "l3_agent"]
        self.assertEqual(published.exchange, "openstack")
        self.assertEqual(json.loads(json.loads(published.body)["oslo.message"])["method"], "router_updated")
        self.assertEqual(self.control.settled, [])
        self.tenant.confirm(published.channel, published.tag)
        self.settle()
        self.assertEqual([(s.method, s.delivery_tag) for s in self.control.settled], [("ack", tag)])
