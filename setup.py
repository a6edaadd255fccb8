"""msgmux packaging.  Runtime dependencies are the design's (Twisted, txAMQP,
attrs, cbor2) plus prometheus_client for the metrics endpoint, and Twisted's
TLS extra (pyOpenSSL, service_identity, idna) for TLS to the brokers."""

from setuptools import find_packages, setup

setup(
    name="msgmux",
    version="0.1.0",
    description="Relay oslo.messaging traffic between a control RabbitMQ and tenant RabbitMQs over a Unix socket",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(exclude=["tests", "tests.*", "lab", "lab.*"]) + ["twisted.plugins"],
    package_data={"msgmux": ["py.typed"], "msgmux.amqp": ["amqp0-9-1.xml"]},
    install_requires=[
        # msgmux relies on a few private details of Twisted and txAMQP
        # (msgmux/_private_apis.py, checked by tests/test_private_apis.py):
        # the upper bounds are the newest versions that test passed with.
        # TLS to the brokers: Twisted's TLS transport and endpoints need
        # pyOpenSSL, and its hostname/IP checks need service_identity and idna.
        "Twisted[tls]>=24.7,<27",
        "txAMQP>=0.8.2,<0.9",
        "attrs>=23.1",
        "cbor2>=5.6",
        # The Prometheus exposition format and process metrics, from the
        # project that defines them, rather than a hand-written encoder.
        "prometheus_client>=0.17",
    ],
    extras_require={
        # PyYAML reads the Prometheus rules and their tests in monitoring/
        # (oslo.config needs it too, so this adds nothing to the install);
        # cryptography makes the lab's certificates at test time.
        "test": ["hypothesis>=6.100", "oslo.messaging>=14", "PyYAML>=6", "cryptography>=42"],
    },
    entry_points={"console_scripts": ["msgmux = msgmux.cli:main"]},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Networking",
    ],
)
