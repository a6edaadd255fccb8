"""
twistd plugin entry for msgmux.  Kept tiny: msgmux.tap is imported only
when twistd actually runs the msgmux plugin.
"""

from twisted.application.service import ServiceMaker

msgmux = ServiceMaker(
    "msgmux",
    "msgmux.tap",
    "Relay oslo.messaging between a control RabbitMQ and tenant RabbitMQs over a Unix socket.",
    "msgmux",
)
