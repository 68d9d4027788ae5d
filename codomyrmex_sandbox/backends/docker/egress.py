"""The ``egress`` network mode: outbound access for sandboxes, and nothing else.

An operator may let a profile's sandboxes reach the outside world. They then join one bridge
network of the project's, created with inter-container traffic off, and host firewall rules
(iptables, inserted once, idempotently, each marked with a comment) drop every packet from that
bridge that is addressed to:

- the host itself, on any of its addresses (the INPUT chain): the server, the engine's API, any
  local service;
- private, shared, loopback, link-local (cloud metadata at 169.254.169.254), multicast and
  reserved ranges (the DOCKER-USER chain, ahead of the engine's own forwarding rules): other
  sandboxes and containers, the host's neighbours.

What remains is the public internet. IPv6 is off in these sandboxes. Setting this up needs root
on the engine's host and iptables; where either is missing the mode fails closed: calls that
need it are refused with a message saying so, and no sandbox starts without its rules.
Every argument here is a constant: no tool argument ever reaches a command line.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import TYPE_CHECKING

from codomyrmex_sandbox.backends.docker.labels import MANAGED
from codomyrmex_sandbox.errors import EngineUnavailableError

if TYPE_CHECKING:
    from codomyrmex_sandbox.backends.docker.engine import Engine

NETWORK_NAME = "codomyrmex-egress"
BRIDGE = "cdmx-egress0"
COMMENT = "codomyrmex-sandbox egress"
BLOCKED = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
)


def firewall_rules() -> list[tuple[str, list[str]]]:
    """(chain, rule) pairs: drop the bridge's traffic to the host, and to every non-public range."""
    mark = ["-m", "comment", "--comment", COMMENT]
    rules = [("INPUT", ["-i", BRIDGE, *mark, "-j", "DROP"])]
    rules += [("DOCKER-USER", ["-i", BRIDGE, "-d", cidr, *mark, "-j", "DROP"]) for cidr in BLOCKED]
    return rules


def ensure_egress(engine: Engine) -> str:
    """Blocking: create the egress network and its firewall rules if missing; returns the network's name."""
    iptables = shutil.which("iptables")
    if iptables is None:
        raise EngineUnavailableError(
            "the egress network mode needs iptables on the engine's host to keep sandboxes away from "
            "the host and private networks, and it is missing; install it (`apt-get install iptables`) "
            'or set network = "none".'
        )
    engine.ensure_network(
        NETWORK_NAME,
        options={
            "com.docker.network.bridge.name": BRIDGE,
            "com.docker.network.bridge.enable_icc": "false",
            "com.docker.network.bridge.enable_ip_masquerade": "true",
        },
        labels={MANAGED: "true"},
    )
    for chain, rule in firewall_rules():
        present = subprocess.run([iptables, "-C", chain, *rule], capture_output=True, check=False)  # noqa: S603
        if present.returncode == 0:
            continue
        added = subprocess.run([iptables, "-I", chain, "1", *rule], capture_output=True, text=True, check=False)  # noqa: S603
        if added.returncode != 0:
            raise EngineUnavailableError(
                f"could not install the egress firewall rule in {chain} ({added.stderr.strip()}); the egress "
                'mode needs root on the engine\'s host. Run the server as root or set network = "none".'
            )
    return NETWORK_NAME
