# -*- test-case-name: tests -*-
"""
msgmux unit tests.

Importing this package registers and loads the Hypothesis profiles every
property-based test here runs under:

 - C{ci} (the default): derandomized, so a plain C{trial tests} checks the
   same examples on every run and a failure is reproducible without the
   example database; 200 examples per test; no deadline, because timing
   depends on the machine and a timing failure says nothing about the code.
 - C{fuzz}: 5000 random examples per test, for hunting bugs locally or in a
   scheduled job.  Select it with C{MSGMUX_HYPOTHESIS_PROFILE=fuzz}.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=200,
    # A derandomized run replays nothing from the database; keeping none
    # avoids writing .hypothesis/ directories into trial's temp directory.
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "fuzz",
    derandomize=False,
    deadline=None,
    max_examples=5000,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("MSGMUX_HYPOTHESIS_PROFILE", "ci"))
