# -*- test-case-name: tests.test_cli -*-
"""
The C{msgmux} command for operators.

 - C{msgmux check-config FILE}: validate a configuration and summarise it
   (exit status 1 and the file/key of the problem otherwise);
 - C{msgmux status --config FILE} (or C{--metrics ENDPOINT}): ask a running
   msgmux for its links, their health, rates and calls in flight.  It reads
   C{/status} twice, a second apart, to compute rates;
 - C{msgmux link add FILE | remove NAME | list | show NAME}: change a running
   control half's links (L{msgmux.linkcli}).

When the reader of its output goes away early (C{msgmux check-config FILE
| head}), it stops quietly with status 141, as a command killed by
C{SIGPIPE} does, instead of a C{BrokenPipeError} traceback.  (It does not
restore C{SIGPIPE}'s default action, which would also kill it on a socket
write to a closed connection.)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any, TextIO

from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, UNIXClientEndpoint
from twisted.web.client import Agent, readBody

from msgmux import linkcli
from msgmux.config import Config, ConfigError, QueueOptions, load
from msgmux.oslo.tokens import key_id
from msgmux.oslo.topology import OsloTopology
from msgmux.routing import own_queue_names

__all__ = ["main"]

#: Exit status when standard output's reader went away: that of a command
#: killed by SIGPIPE, which shells and C{set -o pipefail} know.
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def _reader_gone() -> int:
    """
    Standard output's reader went away: send what is still buffered for it
    to /dev/null, so that the interpreter's last flush does not fail again.

    @return: the exit status.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def _tls(broker: Any) -> str:
    """How a half reaches its broker, for the summary."""
    if broker.tls is None:
        text = ", plain AMQP"
    else:
        tls = broker.tls
        text = f", TLS (CA {tls.ca_file or 'system'}, {'verified' if tls.verify else 'NOT verified'}"
        text += f", client certificate {tls.cert_file})" if tls.cert_file else ")"
    return text + f", login {broker.login_method}"


def describe(config: Config) -> str:
    """A short human summary of a valid configuration."""
    lines = []
    if config.control is not None:
        control = config.control
        hosts = ", ".join(f"{h.host}:{h.port}" for h in control.broker.hosts)
        lines.append(
            f"control half: broker {hosts} vhost {control.broker.virtual_host!r}, exchange {control.broker.exchange!r}"
            + _tls(control.broker)
        )
        if control.reply_key is not None:
            verifying = ", ".join(key_id(key) for key in control.reply_verify_keys) or "no other"
            lines.append(f"  reply keys: signing with {key_id(control.reply_key)}, also verifying {verifying}")
        for link in control.links:
            lines.append(f"  link {link.name}: socket {link.socket} (mode {link.socket_mode:o})")
            for rule in link.down:
                lines.append(f"    down  rpc {rule.topic} servers={list(rule.servers)} fanout={rule.fanout} methods={list(rule.methods)}")
            for rule in link.up:
                lines.append(f"    up    rpc {rule.topic} servers={list(rule.servers)} fanout={rule.fanout} methods={list(rule.methods)}")
            for direction, rules in (("down", link.notifications_down), ("up", link.notifications_up)):
                for note in rules:
                    lines.append(f"    {direction:5} notifications {note.topic} priorities={list(note.priorities)}")
            if link.tenant is not None:
                tenant = link.tenant
                hosts = ", ".join(f"{h.host}:{h.port}" for h in tenant.broker.hosts)
                lines.append(
                    f"    tenant half run by msgmux: namespace {tenant.namespace}, user {tenant.user}:{tenant.group},"
                    f" broker {hosts} vhost {tenant.broker.virtual_host!r}"
                )
            # A tenant half that is not supervised has its broker's options in its own file;
            # only a pool's name depends on them (its exchange).
            control_topology = OsloTopology(control.broker.queues, control.broker.exchange)
            if link.tenant is not None:
                tenant_topology, assumed = OsloTopology(link.tenant.broker.queues, link.tenant.broker.exchange), ""
            else:
                tenant_topology = OsloTopology(QueueOptions(), control.broker.exchange)
                assumed = f" (if its exchange is {control.broker.exchange!r} too)" if link.notifications_up else ""
            for broker, rpc_rules, notification_rules, topology, caveat in (
                ("control", link.down, link.notifications_down, control_topology, ""),
                ("tenant", link.up, link.notifications_up, tenant_topology, assumed),
            ):
                names = ", ".join(own_queue_names(link.name, rpc_rules, notification_rules, topology))
                lines.append(f"    msgmux's own queues on the {broker} broker{caveat}: {names}")
            limits = link.limits
            lines.append(
                f"    limits: {limits.max_message_size} bytes, {limits.max_rate:g} msg/s (burst {limits.burst}),"
                f" {limits.max_inflight_calls} calls in flight"
            )
    if config.control is not None and config.control.admin_socket is not None:
        lines.append(f"admin socket: {config.control.admin_socket}; links added at run time kept in {config.control.state_file}")
    if config.tenant is not None:
        tenant = config.tenant
        hosts = ", ".join(f"{h.host}:{h.port}" for h in tenant.broker.hosts)
        lines.append(f"tenant half: broker {hosts} vhost {tenant.broker.virtual_host!r}, socket {tenant.socket}" + _tls(tenant.broker))
    return "\n".join(lines)


def check_config(path: str, out: TextIO) -> int:
    """@return: the exit status."""
    try:
        config = load(path)
    except ConfigError as e:
        print(f"msgmux: {e}", file=sys.stderr)
        return 1
    print(f"{path}: OK", file=out)
    print(describe(config), file=out)
    return 0


def client_endpoint(reactor: Any, description: str) -> Any:
    """
    @param description: the server endpoint msgmux listens on for metrics
        (C{tcp:9464:interface=127.0.0.1}, C{unix:/run/msgmux/metrics.sock}).
    @return: a client endpoint reaching it.
    """
    kind, *fields = _endpoint_fields(description)
    options = dict(field.split("=", 1) for field in fields if "=" in field)
    positional = [field for field in fields if "=" not in field]
    if kind == "unix":
        return UNIXClientEndpoint(reactor, options.get("address") or options.get("path") or positional[0])
    port = int(options.get("port") or positional[0])
    if kind == "tcp6":
        return TCP6ClientEndpoint(reactor, options.get("interface", "::1"), port)
    return TCP4ClientEndpoint(reactor, options.get("interface", "127.0.0.1"), port)


def _endpoint_fields(description: str) -> list[str]:
    """
    Split an endpoint description at its colons, as Twisted does: a
    backslash makes the next character literal (C{interface=\\:\\:1}).
    """
    fields: list[str] = []
    current: list[str] = []
    escaped = False
    for character in description:
        if escaped:
            current.append(character)
            escaped = False
        elif character == "\\":
            escaped = True
        elif character == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(character)
    fields.append("".join(current))
    return fields


class _EndpointFactory:
    def __init__(self, endpoint: Any) -> None:
        self._endpoint = endpoint

    def endpointForURI(self, uri: Any) -> Any:
        return self._endpoint


async def fetch_status(reactor: Any, metrics: str) -> dict[str, Any]:
    """GET C{/status} from a running msgmux."""
    agent = Agent.usingEndpointFactory(reactor, _EndpointFactory(client_endpoint(reactor, metrics)))
    response = await agent.request(b"GET", b"http://msgmux/status")
    body = await readBody(response)
    if response.code != 200:
        raise RuntimeError(f"/status answered {response.code}")
    return json.loads(body)  # type: ignore[no-any-return]


def render_status(first: dict[str, Any], second: dict[str, Any], interval: float) -> str:
    """A table of links with rates computed from two samples."""
    before = {(link["half"], link["link"]): link for link in first["links"]}
    lines = [f"{'half':8} {'link':20} {'up':4} {'healthy':8} {'rtt ms':>7} {'down/s':>8} {'up/s':>8} {'calls':>6} {'rejected':>9}"]
    for link in second["links"]:
        old = before.get((link["half"], link["link"]), link)
        rates = [(link["relayed"][d] - old["relayed"][d]) / interval for d in ("down", "up")]
        healthy = link.get("healthy")
        rtt = link.get("canary_round_trip")
        inflight = link.get("inflight_calls")
        lines.append(
            f"{link['half']:8} {link['link']:20} {'yes' if link['up'] else 'no':4}"
            f" {'-' if healthy is None else ('yes' if healthy else 'NO'):8}"
            f" {'-' if rtt is None else f'{1000 * rtt:.1f}':>7} {rates[0]:>8.1f} {rates[1]:>8.1f}"
            f" {'-' if inflight is None else inflight['down'] + inflight['up']:>6}"
            f" {link['rejected']['down'] + link['rejected']['up']:>9}"
        )
    halves = second.get("tenant_halves")
    if halves:
        lines.append(f"{'tenant half':24} {'state':22} {'pid':>7} {'restarts':>8} {'uptime s':>9}  last exit")
        for half in halves:
            last = "-" if half["last_exit"] is None else f"{half['last_exit']} ({half['last_reason']})"
            lines.append(
                f"{half['link']:24} {half['state']:22} {half['pid'] or '-':>7} {half['restarts']:>8}"
                f" {'-' if half['uptime'] is None else half['uptime']:>9}  {last}"
            )
    for broker in second["brokers"]:
        state = "connected to " + broker["address"] if broker["connected"] else "DISCONNECTED"
        if broker["connected"] and broker.get("tls"):
            state += " over TLS"
        if broker.get("blocked"):
            state += f" (blocked: {broker['blocked']})"
        for address, reason in sorted((broker.get("failing") or {}).items()):
            state += f"; {address} failing ({reason})"
        lines.append(f"broker {broker['name']}: {state}")
    return "\n".join(lines)


async def status(reactor: Any, arguments: argparse.Namespace) -> int:
    metrics = arguments.metrics
    if metrics is None:
        try:
            config = load(arguments.config)
        except ConfigError as e:
            print(f"msgmux: {e}", file=sys.stderr)
            return 1
        metrics = (config.control.metrics if config.control else None) or (config.tenant.metrics if config.tenant else None)
        if metrics is None:
            print(f"msgmux: {arguments.config} has no metrics endpoint, so there is no status to ask for", file=sys.stderr)
            return 1
    try:
        first = await fetch_status(reactor, metrics)
        await task.deferLater(reactor, arguments.interval, lambda: None)
        second = await fetch_status(reactor, metrics)
    except Exception as e:
        print(f"msgmux: cannot reach msgmux at {metrics}: {e}", file=sys.stderr)
        return 1
    if arguments.json:
        print(json.dumps(second, indent=2))
    else:
        print(render_status(first, second, arguments.interval))
    unhealthy = [link for link in second["links"] if link.get("healthy") is False]
    return 2 if unhealthy else 0


def main(argv: list[str] | None = None) -> None:
    """Run the command line C{argv} (default: C{sys.argv}) and exit."""
    try:
        try:
            _main(argv)
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        sys.exit(_reader_gone())


def _main(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(prog="msgmux", description="Operate msgmux, the oslo.messaging proxy.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file")
    state = commands.add_parser("status", help="links, health, rates and calls in flight of a running msgmux")
    where = state.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="the running msgmux's configuration (its metrics endpoint is used)")
    where.add_argument("--metrics", help="the metrics endpoint, e.g. tcp:9464:interface=127.0.0.1")
    state.add_argument("--interval", type=float, default=1.0, help="seconds between the two samples (rates)")
    state.add_argument("--json", action="store_true", help="print the raw status document")
    linkcli.add_arguments(commands)
    arguments = parser.parse_args(argv)
    if arguments.command == "check-config":
        sys.exit(check_config(arguments.file, sys.stdout))
    if arguments.command == "link":
        sys.exit(linkcli.run(arguments))

    def run(reactor: Any) -> defer.Deferred[None]:
        async def go() -> None:
            try:
                code = await status(reactor, arguments)
                sys.stdout.flush()
            except BrokenPipeError:
                code = _reader_gone()
            if code:
                raise SystemExit(code)

        return defer.Deferred.fromCoroutine(go())

    task.react(run)


if __name__ == "__main__":
    main()
