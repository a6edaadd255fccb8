"""
Integration tests: real RabbitMQ brokers, real oslo.messaging, real
C{twistd msgmux} processes, the tenant side inside a network namespace.

They need root, C{ip netns} and the RabbitMQ server package; C{make test}
runs them (it sets C{MSGMUX_INTEGRATION=1}).  Without that variable they are
skipped, so a plain C{trial tests} stays quick and side-effect free.
"""
