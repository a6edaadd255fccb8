"""
The control half: the trust boundary.

It runs in the control network with the control broker's credentials and
one listening Unix socket per link.  Its parts:

 - L{msgmux.control.link.ControlLink}: one link across its sessions;
 - L{msgmux.control.factory.ControlLinkFactory} and
   L{msgmux.control.listener.LinkListener}: the link's socket;
 - L{msgmux.control.policy.ControlPolicy}: what one session consumes and
   publishes, built from L{msgmux.control.upstream} (the checks on
   everything a tenant half sends) and L{msgmux.control.downstream} (what
   happens to control-side messages on their way down), with
   L{msgmux.control.rewrite} (calls and their reply tokens);
 - L{msgmux.control.canaries.Canaries}: link health;
 - L{msgmux.control.memory}: what must not happen twice.
"""

from msgmux.control.factory import ControlLinkFactory
from msgmux.control.link import ControlLink
from msgmux.control.upstream import IDENTITY_HEADER

__all__ = ["ControlLink", "ControlLinkFactory", "IDENTITY_HEADER"]
