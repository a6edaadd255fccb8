"""
msgmux: relays oslo.messaging traffic between a control-network RabbitMQ and
tenant-network RabbitMQs over a Unix socket, without connecting the networks.

See C{docs/} for the architecture, the link protocol and the operator guide.
"""

__version__ = "0.1.0"
