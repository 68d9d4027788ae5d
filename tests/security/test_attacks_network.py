"""Network egress and ingress (NET-01 to NET-09): a sandbox has loopback and nothing else.

The host side listens for real: TCP on every address and on the docker0 gateway, TCP on IPv6, and
UDP (the `listeners` fixture); none may ever see a connection or a datagram. "The internet" is
only ever a reserved address that routes nowhere (TEST-NET-2/3, 2001:db8::/32) or a name lookup.
"""

from __future__ import annotations

import json
import socket
import time

import anyio
import pytest

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module"), pytest.mark.usefixtures("host_is_clean")]

T = 5
LIMITS = {"timeout_seconds": T, "memory_mb": 256}
GATEWAY = "172.17.0.1"
INTERNET_V4 = ["198.51.100.1", "203.0.113.1"]  # TEST-NET-2 and TEST-NET-3: reserved, routed nowhere
INTERNET_V6 = "2001:db8::1"
METADATA = [("169.254.169.254", 80), ("169.254.170.2", 80), ("100.100.100.200", 80), ("fd00:ec2::254", 80)]
REFUSALS = {"ENETUNREACH", "EHOSTUNREACH", "EADDRNOTAVAIL", "ECONNREFUSED", "EAFNOSUPPORT", "timeout"}

# connect(targets) prints one JSON line per target: how long it took and how it failed.
CONNECT = """
import errno, json, socket, time
def connect(targets, kind=socket.SOCK_STREAM):
    out = []
    for host, port in targets:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        start = time.monotonic()
        s = socket.socket(family, kind)
        s.settimeout(2)
        try:
            if kind == socket.SOCK_STREAM:
                s.connect((host, port))
                outcome = "connected"
            else:
                s.sendto(b"ping", (host, port))
                outcome = "sent"
        except socket.timeout:
            outcome = "timeout"
        except OSError as exc:
            outcome = errno.errorcode.get(exc.errno, str(exc.errno))
        finally:
            s.close()
        out.append([host, port, outcome, round(time.monotonic() - start, 3)])
    print(json.dumps(out))
"""


def outcomes(stdout: str) -> list[tuple[str, int, str, float]]:
    return [tuple(item) for line in stdout.splitlines() if line.startswith("[") for item in json.loads(line)]


async def test_dns_lookups_fail_fast(server):
    """NET-01"""
    code = """
import socket, time
for name in ["example.com", "metadata.google.internal", "host.docker.internal", "gateway.docker.internal",
             "kubernetes.default.svc"]:
    start = time.monotonic()
    try:
        socket.getaddrinfo(name, 443)
        outcome = "resolved"
    except OSError as exc:
        outcome = type(exc).__name__
    print(name, outcome, round(time.monotonic() - start, 3))
"""
    shell = "start=$SECONDS; getent hosts example.com; echo getent=$? seconds=$((SECONDS - start))"
    result = await server.run(code, **LIMITS)
    shell_result = await server.run(shell, language="bash", **LIMITS)

    assert result["status"] == "success", result
    lines = [line.split() for line in result["stdout"].splitlines()]
    assert len(lines) == 5
    for name, outcome, seconds in lines:
        assert outcome == "gaierror", (name, outcome)
        assert float(seconds) < 1.0, f"looking up {name} took {seconds} s"
    assert shell_result["stdout"].startswith("getent=2 "), shell_result["stdout"]


async def test_tcp_and_http_to_the_internet_fail(server, listeners):
    """NET-02"""
    targets = [(host, port) for host in INTERNET_V4 for port in (80, 443)] + [(INTERNET_V6, 443)]
    code = (
        CONNECT
        + f"connect({targets!r})\n"
        + """
import urllib.request
for url in ["http://203.0.113.1/", "https://198.51.100.1/"]:
    try:
        urllib.request.urlopen(url, timeout=2)
        print("http", url, "answered")
    except OSError as exc:
        print("http", url, "failed")
"""
    )
    start = time.monotonic()
    result = await server.run(code, **LIMITS)
    elapsed = time.monotonic() - start

    assert result["status"] == "success", result
    for host, port, outcome, seconds in outcomes(result["stdout"]):
        assert outcome in REFUSALS, (host, port, outcome)
        assert seconds < 0.5, f"connecting to {host}:{port} took {seconds} s instead of failing at once"
    assert result["stdout"].count(" failed\n") == 2
    assert elapsed < T
    assert listeners.hits == []


async def test_cloud_metadata_endpoints_are_unreachable(server):
    """NET-03"""
    code = (
        CONNECT
        + f"connect({METADATA!r})\n"
        + """
import urllib.request
try:
    urllib.request.urlopen("http://169.254.169.254/latest/meta-data/iam/security-credentials/", timeout=2)
    print("metadata answered")
except OSError:
    print("metadata failed")
"""
    )
    result = await server.run(code, **LIMITS)

    assert result["status"] == "success", result
    found = outcomes(result["stdout"])
    assert len(found) == len(METADATA)
    for host, port, outcome, _ in found:
        assert outcome in REFUSALS, (host, port, outcome)
    assert result["stdout"].endswith("metadata failed\n")


async def test_host_loopback_gateway_and_docker_api_are_unreachable_and_no_host_listener_sees_a_connection(
    server, listeners
):
    """NET-04"""
    targets = [*listeners.tcp_targets(), (GATEWAY, 2375), (GATEWAY, 2376), ("127.0.0.1", 2375)]
    sockets = ["/var/run/docker.sock", "/run/docker.sock", "/run/containerd/containerd.sock"]
    code = CONNECT + f"connect({targets!r})\nimport os\nprint('sockets', [p for p in {sockets!r} if os.path.exists(p)])"
    result = await server.run(code, **LIMITS)

    assert result["status"] == "success", result
    found = outcomes(result["stdout"])
    assert len(found) == len(targets)
    for host, port, outcome, _ in found:
        assert outcome in REFUSALS, f"{host}:{port} {outcome}"
    assert result["stdout"].splitlines()[-1] == "sockets []"
    assert listeners.hits == []


async def test_raw_and_packet_sockets_are_denied(server):
    """NET-05"""
    code = """
import errno, socket
for name, family, kind, proto in [
    ("raw icmp", socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
    ("raw ip", socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW),
    ("raw tcp", socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP),
    ("raw icmpv6", socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6),
    ("packet raw", socket.AF_PACKET, socket.SOCK_RAW, 0x0003),
    ("packet dgram", socket.AF_PACKET, socket.SOCK_DGRAM, 0x0003),
]:
    try:
        socket.socket(family, kind, proto).close()
        print(name, "allowed")
    except OSError as exc:
        print(name, errno.errorcode[exc.errno])
"""
    result = await server.run(code, **LIMITS)

    assert result["status"] == "success", result
    lines = result["stdout"].splitlines()
    assert len(lines) == 6
    for line in lines:
        assert line.rsplit(" ", 1)[1] in {"EPERM", "EACCES", "EAFNOSUPPORT"}, line


async def test_a_listener_in_the_sandbox_is_unreachable_from_the_host(server, engine, listeners):
    """NET-06"""
    port = engine.free_port()
    gate = "sleep 20.0606"
    code = f"""
import socket, subprocess
servers = []
for family, address in [(socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")]:
    s = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((address, {port}))
    s.listen(8)
    s.settimeout(0.5)
    servers.append(s)
print("listening", flush=True)
subprocess.run({gate.split()!r})  # the host tries to connect meanwhile
for s in servers:
    try:
        conn, peer = s.accept()
        print("accepted", peer)
    except socket.timeout:
        print("no connection")
"""
    results: dict[str, dict] = {}
    attempts: dict[str, str] = {}
    async with anyio.create_task_group() as tg:

        async def listen() -> None:
            results["listen"] = await server.run(code, **LIMITS)

        tg.start_soon(listen)
        container, process = await engine.wait_for_process(server.pid, gate)
        info = await anyio.to_thread.run_sync(engine.inspect, container)
        addresses = ["127.0.0.1", GATEWAY, "::1", *listeners.host_addresses]
        for network in (info["NetworkSettings"].get("Networks") or {}).values():
            addresses += [a for a in (network.get("IPAddress"), network.get("GlobalIPv6Address")) if a]

        def try_connect(address: str) -> str:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(1)
                try:
                    sock.connect((address, port))
                except OSError as exc:
                    return type(exc).__name__
            return "connected"

        for address in addresses:
            attempts[address] = await anyio.to_thread.run_sync(try_connect, address)
        engine.release(process)

    result = results["listen"]
    assert result["status"] == "success", result
    assert result["stdout"] == "listening\nno connection\nno connection\n"
    assert info["HostConfig"]["NetworkMode"] == "none"
    assert set((info["NetworkSettings"].get("Networks") or {}).keys()) <= {"none"}
    assert not info["NetworkSettings"].get("Ports")
    assert "connected" not in attempts.values(), attempts


async def test_udp_icmp_and_ipv6_fail_and_only_loopback_exists(server, listeners):
    """NET-07"""
    udp_targets = [(INTERNET_V4[1], 53), (GATEWAY, listeners.udp_any)]
    udp_targets += [(a, listeners.udp_any) for a in listeners.host_addresses if ":" not in a]
    v6_targets = [(INTERNET_V6, 80)] + [(a, 80) for a in listeners.host_addresses if ":" in a]
    code = (
        CONNECT
        + f"connect({udp_targets!r}, socket.SOCK_DGRAM)\nconnect({v6_targets!r})\n"
        + """
import errno, os
try:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
    s.sendto(b"\\x08\\x00\\xf7\\xff\\x00\\x00\\x00\\x00", ("203.0.113.1", 0))
    print("icmp sent")
except OSError as exc:
    print("icmp", errno.errorcode[exc.errno])
print("interfaces", sorted(os.listdir("/sys/class/net")))
print("routes", len(open("/proc/net/route").read().splitlines()) - 1)
print("v6 routes", sorted({line.split()[-1] for line in open("/proc/net/ipv6_route")}))
"""
    )
    result = await server.run(code, **LIMITS)

    assert result["status"] == "success", result
    found = outcomes(result["stdout"])
    assert len(found) == len(udp_targets) + len(v6_targets)
    for host, port, outcome, _ in found:
        assert outcome in REFUSALS, f"{host}:{port} {outcome}"
    lines = result["stdout"].splitlines()
    assert lines[-4] in {"icmp EACCES", "icmp EPERM", "icmp ENETUNREACH"}, lines[-4]
    assert lines[-3] == "interfaces ['lo']"
    assert lines[-2] == "routes 0"
    assert lines[-1] in {"v6 routes ['lo']", "v6 routes []"}
    assert listeners.hits == []


async def test_javascript_fetch_to_metadata_internet_and_docker_api_fails(server, listeners):
    """NET-08"""
    urls = [
        "http://169.254.169.254/latest/meta-data/",
        "http://203.0.113.1/",
        "https://198.51.100.1/",
        f"http://[{INTERNET_V6}]/",
        f"http://{GATEWAY}:2375/version",
        f"http://{GATEWAY}:{listeners.tcp_any}/",
        "http://example.com/",
    ] + [f"http://{h if ':' not in h else '[' + h + ']'}:{p}/" for h, p in listeners.tcp_targets()]
    code = f"""
const dns = require('dns');
async function main() {{
  for (const url of {json.dumps(urls)}) {{
    try {{
      await fetch(url, {{ signal: AbortSignal.timeout(2000) }});
      console.log('answered ' + url);
    }} catch (err) {{
      console.log('failed ' + url + ' ' + ((err.cause && err.cause.code) || err.name));
    }}
  }}
  await new Promise((resolve) => dns.lookup('example.com', (err) => {{
    console.log(err ? 'dns failed ' + err.code : 'dns resolved');
    resolve();
  }}));
}}
main();
"""
    result = await server.run(code, language="javascript", **LIMITS)

    assert result["status"] == "success", result
    lines = result["stdout"].splitlines()
    assert len(lines) == len(urls) + 1, lines
    assert all(line.startswith("failed ") for line in lines[:-1]), lines
    causes = {line.rsplit(" ", 1)[1] for line in lines[:-1]}
    network_errors = {"ENETUNREACH", "EHOSTUNREACH", "ECONNREFUSED", "EADDRNOTAVAIL", "EAI_AGAIN", "ENOTFOUND"}
    assert causes <= network_errors, f"fetch failed for another reason than the network: {causes}"
    assert "TimeoutError" not in result["stdout"], "a fetch hung instead of failing at once"
    assert lines[-1].startswith("dns failed"), lines[-1]
    assert listeners.hits == []


async def test_bash_dev_tcp_and_network_tools_fail(server, listeners):
    """NET-09"""
    targets = [(GATEWAY, listeners.tcp_any), ("203.0.113.1", 80), (GATEWAY, 2375)]
    targets += [(h, p) for h, p in listeners.tcp_targets() if ":" not in h]
    lines = [
        f"(echo hi > /dev/tcp/{h}/{p}) 2>/dev/null && echo 'tcp {h}:{p} connected' || echo 'tcp {h}:{p} failed'"
        for h, p in targets
    ]
    lines.append(f"(echo hi > /dev/udp/{GATEWAY}/{listeners.udp_any}) 2>/dev/null && echo udp sent || echo udp failed")
    lines.append("for t in curl wget nc ncat netcat socat dig nslookup host ping ssh telnet python3 perl; do")
    lines.append('  command -v "$t" >/dev/null && echo "tool $t present"; done')
    lines.append("getent hosts example.com >/dev/null || echo dns failed")
    result = await server.run("\n".join(lines), language="bash", **LIMITS)

    assert result["status"] == "success", result
    out = result["stdout"].splitlines()
    assert [line for line in out if line.startswith("tcp")] == [f"tcp {h}:{p} failed" for h, p in targets]
    assert "udp failed" in out
    assert [line for line in out if line.startswith("tool")] == []
    assert out[-1] == "dns failed"
    assert listeners.hits == []
