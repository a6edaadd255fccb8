"""
Tests for L{msgmux.tap}: the command line refuses bad configurations before
anything starts, L{makeService} only composes, and the service binds and
connects through the reactor it is given.  A L{MemoryReactorClock} stands in
for the real reactor, so nothing touches the network.
"""

from __future__ import annotations

import gc
import os

from twisted.application.service import IService, IServiceMaker
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHostnameResolver, IHostResolution, IResolutionReceiver
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import IPlugin, getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from msgmux import tap
from msgmux.config import Config

CONTROL = """
[control]
transport_url = "rabbit://guest:guest@192.0.2.7:5673,192.0.2.8/"
[[control.links]]
name = "tenant-a"
socket = "{socket}"
socket_mode = "0640"
down = [ {{ topic = "l3_agent", fanout = true }} ]
"""

TENANT = """
[tenant]
transport_url = "rabbit://t:t@198.51.100.3:5674/vh"
socket = "{socket}"
"""


@implementer(IHostResolution)
class Resolution:
    """A finished resolution."""

    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        """Nothing to cancel: resolution is synchronous."""


@implementer(IHostnameResolver)
class LiteralResolver:
    """
    Resolves IP literals to themselves (MemoryReactor's own resolver maps every
    name to 127.0.0.1), so tests see which broker host was dialled.
    """

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: object = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        """Resolve C{hostName} to itself, synchronously."""
        resolution = Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        address = IPv6Address if ":" in hostName else IPv4Address
        resolutionReceiver.addressResolved(address("TCP", hostName, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


class OptionsTests(SynchronousTestCase):
    """C{twistd msgmux --config FILE} validates the file up front."""

    def write(self, text: str) -> str:
        """Write C{text} to a fresh file and return its absolute path."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_missing_config(self) -> None:
        """Without --config the command line is refused."""
        error = self.assertRaises(usage.UsageError, tap.Options().parseOptions, [])
        self.assertIn("--config", str(error))

    def test_bad_config(self) -> None:
        """A config error becomes a UsageError naming the file and the key."""
        path = self.write(CONTROL.format(socket="relative.sock"))
        error = self.assertRaises(usage.UsageError, tap.Options().parseOptions, ["--config", path])
        self.assertIn(path, str(error))
        self.assertIn("control.links[0].socket", str(error))

    def test_unreadable_config(self) -> None:
        """A config file that cannot be read is a UsageError naming it."""
        path = os.path.abspath(self.mktemp())
        error = self.assertRaises(usage.UsageError, tap.Options().parseOptions, ["-c", path])
        self.assertIn(path, str(error))

    def test_valid_config(self) -> None:
        """A valid file is parsed into options.config."""
        path = self.write(CONTROL.format(socket="/run/msgmux/a.sock"))
        options = tap.Options()
        options.parseOptions(["--config", path])
        self.assertIsInstance(options.config, Config)
        self.assertEqual(options.config.path, path)
        assert options.config.control is not None
        self.assertEqual(options.config.control.links[0].name, "tenant-a")
        short = tap.Options()
        short.parseOptions(["-c", path])
        self.assertEqual(short.config, options.config)


class ServiceTests(SynchronousTestCase):
    """makeService composes; starting binds and connects through the given reactor."""

    def service(self, text: str) -> tuple[IService, MemoryReactorClock, str]:
        """Build the service for C{text} (C{{socket}} filled in) on a memory reactor."""
        directory = os.path.abspath(self.mktemp())
        socket = os.path.join(directory, "a.sock")
        path = os.path.join(os.path.dirname(directory), "msgmux.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text.format(socket=socket))
        options = tap.Options()
        options.parseOptions(["--config", path])
        reactor = MemoryReactorClock()
        reactor.installNameResolver(LiteralResolver())
        self.addCleanup(gc.unfreeze)  # starting freezes the heap, which here is the test runner's
        return tap.makeService(options, reactor), reactor, socket

    def stop(self, service: IService, reactor: MemoryReactorClock) -> None:
        """Stop C{service}; it returns a Deferred that fires once the clock has run."""
        stopping = service.stopService()
        self.assertIsInstance(stopping, Deferred)
        reactor.advance(60)
        self.assertIsNone(self.successResultOf(stopping))
        self.assertFalse(service.running)

    def test_make_service_does_nothing(self) -> None:
        """makeService neither listens, connects nor schedules anything."""
        service, reactor, socket = self.service(CONTROL)
        self.assertTrue(IService.providedBy(service))
        self.assertFalse(service.running)
        self.assertEqual((reactor.unixServers, reactor.tcpClients, reactor.unixClients), ([], [], []))
        self.assertFalse(os.path.exists(os.path.dirname(socket)))

    def test_control_half(self) -> None:
        """Starting a control config listens on the link socket and connects to the first broker host."""
        service, reactor, socket = self.service(CONTROL)
        service.startService()
        self.assertTrue(service.running)
        self.assertEqual([(server[0], server[3]) for server in reactor.unixServers], [(socket, 0o640)])
        self.assertEqual([(client[0], client[1]) for client in reactor.tcpClients], [("192.0.2.7", 5673)])
        self.assertEqual(reactor.unixClients, [])
        self.assertTrue(os.path.isdir(os.path.dirname(socket)))
        self.stop(service, reactor)

    def test_heap_frozen_once_started(self) -> None:
        """What was built to start is exempt from the cycle collector from then on (gc.freeze)."""
        gc.unfreeze()
        service, reactor, _ = self.service(CONTROL)
        self.assertEqual(gc.get_freeze_count(), 0)
        service.startService()
        self.assertGreater(gc.get_freeze_count(), 0)
        self.stop(service, reactor)

    def test_tenant_half(self) -> None:
        """Starting a tenant config connects to its broker and to the link socket."""
        service, reactor, socket = self.service(TENANT)
        service.startService()
        self.assertEqual(reactor.unixServers, [])
        self.assertEqual([(client[0], client[1]) for client in reactor.tcpClients], [("198.51.100.3", 5674)])
        self.assertEqual([client[0] for client in reactor.unixClients], [socket])
        self.stop(service, reactor)

    def test_both_halves(self) -> None:
        """A config with both halves runs both, talking over the same socket."""
        service, reactor, socket = self.service(CONTROL + TENANT)
        service.startService()
        self.assertEqual([server[0] for server in reactor.unixServers], [socket])
        self.assertEqual(sorted((c[0], c[1]) for c in reactor.tcpClients), [("192.0.2.7", 5673), ("198.51.100.3", 5674)])
        self.assertEqual([client[0] for client in reactor.unixClients], [socket])
        self.stop(service, reactor)


class PluginTests(SynchronousTestCase):
    """twistd finds the msgmux plugin."""

    def test_discoverable(self) -> None:
        """getPlugins(IServiceMaker) yields exactly one maker with tapname msgmux, wired to msgmux.tap."""
        makers = [maker for maker in getPlugins(IServiceMaker) if maker.tapname == "msgmux"]
        self.assertEqual(len(makers), 1)
        maker = makers[0]
        self.assertTrue(IPlugin.providedBy(maker))
        self.assertTrue(IServiceMaker.providedBy(maker))
        self.assertIs(maker.options, tap.Options)
        self.assertEqual(maker.makeService, tap.makeService)
        self.assertTrue(maker.description)
