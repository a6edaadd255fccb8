# -*- test-case-name: tests.test_broker -*-
"""
A long-lived, reconnecting connection to one broker.

L{BrokerService} is a Twisted service around a L{ClientService}: it connects
to the hosts of a transport URL in failover order, logs in (a login failure
counts as a failed attempt, so backoff applies), and tells its observers when
a usable connection appears and when it goes.  Observers own their channels
and rebuild their topology on every new connection.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from msgmux.amqp.attempt import AttemptFactory
from msgmux.amqp.attempts import ConnectFailures, classify
from msgmux.amqp.protocol import BrokerDelegate, BrokerProtocol
from msgmux.amqp.tls import TlsClient
from msgmux.config import BrokerConfig, BrokerHost

#: Seconds from TCP connect to a completed AMQP login.  A host that accepts
#: connections but never speaks AMQP (a wedged broker, the wrong service on
#: the port) counts as a failed attempt after it, so the next host is tried;
#: with AMQP heartbeats off nothing else would ever give up on it.
LOGIN_TIMEOUT = 30.0


class BrokerObserver(Protocol):
    """Something that uses a broker connection while it exists."""

    def broker_connected(self, protocol: BrokerProtocol) -> None:
        """A logged-in connection is ready."""

    def broker_lost(self, reason: Failure) -> None:
        """The connection is gone; its channels are closed."""


class FailoverEndpoint:
    """
    Connects to one of several brokers: the same host again after a
    connection that worked, the next one after a failed attempt.

    With C{tls}, every connection is TLS (Twisted's TLS over the same TCP
    endpoint), checked against the host as written in the URL; the TLS
    handshake is part of the attempt, so its failure moves on like a refused
    login does.

    @ivar current: the host of the latest attempt.
    @ivar attempt_failed: called with the host and the error when an attempt
        fails before a connection is made.
    """

    def __init__(
        self,
        reactor: Any,
        hosts: tuple[BrokerHost, ...],
        timeout: float = 10.0,
        tls: TlsClient | None = None,
        own: Any = lambda: None,
    ) -> None:
        """
        @param tls: makes every connection TLS, checked against the host as
            written in the URL.
        @param own: returns msgmux's protocol of the latest attempt (see
            L{msgmux.amqp.attempt}).
        """
        self._reactor = reactor
        self._hosts = hosts
        self._index = 0
        self._timeout = timeout
        self._tls = tls
        self._own = own
        self._attempt: AttemptFactory | None = None
        self.current = hosts[0]
        self.attempt_failed: Callable[[BrokerHost, BaseException], None] | None = None

    def failed(self) -> None:
        """The attempt on L{current} failed: move on to the next host."""
        self._index = (self._index + 1) % len(self._hosts)

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        self.current = self._hosts[self._index]
        endpoint: Any = HostnameEndpoint(self._reactor, self.current.host, self.current.port, timeout=self._timeout)
        if self._tls is not None:
            endpoint = wrapClientTLS(self._tls.creator(self.current.host), endpoint)
        self._attempt = attempts = AttemptFactory(factory, self._own)
        connecting: defer.Deferred[Any] = endpoint.connect(attempts)
        # ClientService gets its own protocol back, not the attempt around it.
        connecting.addCallbacks(lambda attempt: attempt.inner, self._attempt_failed)
        return connecting

    def accept(self) -> None:
        """The latest connection logged in: from now on ClientService hears when it goes."""
        if self._attempt is not None and self._attempt.latest is not None:
            self._attempt.latest.accept()

    def abandon(self) -> None:
        """Close the latest connection, which ClientService counts as a failed attempt (its login failed)."""
        self.failed()
        if self._attempt is not None and self._attempt.latest is not None:
            self._attempt.latest.abandon()

    def _attempt_failed(self, failure: Failure) -> Failure:
        self.failed()
        if self.attempt_failed is not None:
            self.attempt_failed(self.current, failure.value)
        return failure

    def __repr__(self) -> str:
        return "<FailoverEndpoint " + ",".join(f"{h.host}:{h.port}" for h in self._hosts) + ">"


class _BrokerFactory(Factory):
    """
    Builds one L{BrokerProtocol} per connection attempt.

    @ivar latest: the protocol of the latest attempt.  L{ClientService}
        hands C{prepareConnection} a proxy; the login needs the protocol
        itself, which is the latest one built (attempts are serial).
    """

    def __init__(self, config: BrokerConfig, endpoint: FailoverEndpoint, clock: IReactorTime, name: str) -> None:
        self._config = config
        self._endpoint = endpoint
        self._clock = clock
        self._name = name
        self.latest: BrokerProtocol | None = None

    def buildProtocol(self, addr: Any) -> BrokerProtocol:
        host = self._endpoint.current
        self.latest = BrokerProtocol(
            BrokerDelegate(),
            vhost=self._config.virtual_host,
            heartbeat=self._config.heartbeat,
            clock=self._clock,
            username=host.username,
            password=host.password,
            connection_name=self._name,
            login_method=self._config.login_method,
        )
        return self.latest


class BrokerService(Service):
    """
    Keeps one logged-in AMQP connection to a broker.

    @ivar protocol: the current connection, or L{None}.
    @ivar display: C{host:port} of the current broker, for logs and status.
    @ivar tls: the TLS client when the broker is reached over TLS.
    @ivar failures: failed connection attempts, by reason.
    """

    _log = Logger()

    def __init__(
        self,
        config: BrokerConfig,
        name: str,
        reactor: IReactorTCP,
        retry_policy: Any = None,
    ) -> None:
        self.name = name
        self.config = config
        self._clock = reactor
        self.tls = TlsClient(config.tls, name) if config.tls is not None else None
        self.failures = ConnectFailures(name)
        self._endpoint = FailoverEndpoint(reactor, config.hosts, tls=self.tls, own=lambda: self._factory.latest)
        self._endpoint.attempt_failed = self._connect_failed
        self._factory = _BrokerFactory(config, self._endpoint, reactor, f"msgmux {name}")
        self._service = ClientService(
            self._endpoint,
            self._factory,  # type: ignore[arg-type]
            retryPolicy=retry_policy or backoffPolicy(initialDelay=0.5, maxDelay=10.0),
            clock=reactor,  # type: ignore[arg-type]
            prepareConnection=self._prepare,
        )
        self.protocol: BrokerProtocol | None = None
        self.display = ""
        self._observers: list[BrokerObserver] = []

    def add_observer(self, observer: BrokerObserver) -> None:
        """
        Register an observer; it hears about the current connection at once.
        """
        self._observers.append(observer)
        if self.protocol is not None:
            observer.broker_connected(self.protocol)

    def remove_observer(self, observer: BrokerObserver) -> None:
        """Forget an observer."""
        if observer in self._observers:
            self._observers.remove(observer)

    def startService(self) -> None:
        super().startService()
        self._service.startService()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return self._service.stopService()

    def when_connected(self, fail_after: int | None = None) -> defer.Deferred[Any]:
        """@return: fires with a logged-in connection (see L{ClientService.whenConnected})."""
        return self._service.whenConnected(failAfterFailures=fail_after)

    def reload_tls(self) -> None:
        """Re-read the TLS certificate, key and CA files for new connections (SIGHUP)."""
        if self.tls is not None:
            self.tls.reload()

    def _connect_failed(self, host: BrokerHost, error: BaseException) -> None:
        reason, text = classify(error, self.tls, None, LOGIN_TIMEOUT)
        self.failures.failed(f"{host.host}:{host.port}", reason, text)

    def _prepare(self, proxy: Any) -> defer.Deferred[None]:
        protocol = self._factory.latest
        assert protocol is not None, "prepareConnection before any connection was built"
        login = defer.Deferred.fromCoroutine(self._login(protocol))
        login.addTimeout(LOGIN_TIMEOUT, self._clock)  # type: ignore[arg-type]
        return login

    async def _login(self, protocol: BrokerProtocol) -> None:
        host = self._endpoint.current
        try:
            await protocol.login()
        except Exception as e:
            reason, text = classify(e, self.tls, protocol.transport, LOGIN_TIMEOUT)
            self.failures.failed(f"{host.host}:{host.port}", reason, text)
            self._endpoint.abandon()
            raise
        self._endpoint.accept()
        self.protocol = protocol
        self.display = f"{host.host}:{host.port}"
        self.failures.succeeded(self.display)
        self._log.info(
            "Connected to {broker} broker at {host}:{port} (RabbitMQ {version}{tls})",
            broker=self.name,
            host=host.host,
            port=host.port,
            version=protocol.server_properties.get("version", "?"),
            tls=_tls_summary(protocol.transport) if self.tls is not None else "",
        )
        protocol.disconnected.wait().addCallback(lambda _: self._lost(protocol))
        for observer in list(self._observers):
            observer.broker_connected(protocol)

    def _lost(self, protocol: BrokerProtocol) -> None:
        if self.protocol is not protocol:
            return
        self.protocol = None
        self._log.warn("Lost the {broker} broker at {host}", broker=self.name, host=self.display)
        reason = Failure(ConnectionError(f"{self.name} broker connection lost"))
        for observer in list(self._observers):
            observer.broker_lost(reason)


def _tls_summary(transport: Any) -> str:
    """@return: C{" over TLS (TLSv1.3)"} for a TLS transport."""
    handle = getattr(transport, "getHandle", lambda: None)()
    version = getattr(handle, "get_protocol_version_name", lambda: "?")()
    return f" over TLS ({version})"
