"""Red-team round 1, finding 7: what a sandbox can learn about where its host keeps it, pinned down.

A sandbox could read host paths in ``/proc/self/mountinfo`` (the engine's data root, overlay layer
ids, its own container id) and its host cgroup path in ``/proc/self/cgroup``. The cgroup path is
now hidden by a cgroup namespace of its own. The mount table is the host kernel's record of the
container's own mounts and stays visible (SECURITY.md, "What a sandbox can learn about its host"):
this test fails if anything beyond that appears, such as another container's id or a host path
outside the engine's data root.
"""

from __future__ import annotations

import json
import re

import pytest

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module"), pytest.mark.usefixtures("host_is_clean")]

LIMITS = {"timeout_seconds": 10, "memory_mb": 256}
CONTAINER_ID = re.compile(r"/containers/([0-9a-f]{64})/")  # the engine's per-container files

READ = {
    "python": "import json\nprint(json.dumps({'mountinfo': open('/proc/self/mountinfo').read(), "
    "'cgroup': open('/proc/self/cgroup').read()}))",
    "javascript": "const fs = require('fs');\nconsole.log(JSON.stringify({mountinfo: "
    "fs.readFileSync('/proc/self/mountinfo', 'utf8'), cgroup: fs.readFileSync('/proc/self/cgroup', 'utf8')}));",
}


def host_paths(mountinfo: str) -> set[str]:
    """Every absolute path in the mount table that names a place on the host, not in the sandbox."""
    found = set()
    for line in mountinfo.splitlines():
        fields = line.split()
        root, mount_point = fields[3], fields[4]
        source_options = fields[fields.index("-") + 3]
        if root != "/" and not root.startswith(("/null", "/bus", "/fs", "/irq", "/sys")):
            found.add(root)  # a bind of a host file or directory
        for option in source_options.split(","):
            key, _, value = option.partition("=")
            if key in {"lowerdir", "upperdir", "workdir"}:
                found.update(value.split(":"))
        assert mount_point.startswith("/"), line
    return found


@pytest.mark.parametrize("language", ["python", "javascript", "bash"])
async def test_a_sandbox_sees_its_own_cgroup_as_the_root_and_only_its_own_place_in_the_engine(server, engine, language):
    # The bash image has no JSON tool: two plain reads, split by a marker line.
    code = READ.get(language, "cat /proc/self/mountinfo; echo '--- cgroup ---'; cat /proc/self/cgroup")
    result = await server.run(code, language=language, **LIMITS)

    assert result["status"] == "success", result
    if language == "bash":
        mountinfo, _, cgroup = result["stdout"].partition("--- cgroup ---\n")
    else:
        found = json.loads(result["stdout"])
        mountinfo, cgroup = found["mountinfo"], found["cgroup"]
    # No host cgroup path: every controller shows the sandbox's own cgroup as "/".
    assert cgroup.strip(), "no cgroup lines were read"
    for line in cgroup.splitlines():
        assert line.split(":", 2)[2] == "/", f"a host cgroup path is visible: {line}"
    # Only the engine's data root, and only this sandbox's own container id.
    data_root = engine.api.info()["DockerRootDir"].rstrip("/")
    paths = host_paths(mountinfo)
    assert paths, "the mount table named no host path at all: the parsing is broken"
    outside = sorted(p for p in paths if not p.startswith((f"{data_root}/overlay2/", f"{data_root}/containers/")))
    assert outside == [], f"host paths outside the engine's data root: {outside}"
    ids = {match for path in paths for match in CONTAINER_ID.findall(path)}
    # The sandbox may be gone by now (its init exits once it has reported the files): its id is
    # the one the server logged for this execution.
    (mine,) = [
        event["container_id"]
        for event in server.audit_events("sandbox_assigned")
        if event["execution_id"] == result["execution_id"]
    ]
    assert ids == {mine}, f"container ids other than the sandbox's own: {ids - {mine}}"
