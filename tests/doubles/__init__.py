"""
Test doubles for msgmux: stand-ins for the peers msgmux talks to, for unit
tests that need no broker, no root and no reactor.
"""
