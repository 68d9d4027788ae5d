"""The contract, call by call: every status decided from its evidence, the limits applied, what goes
in and what comes out. Each case is one scenario of tests/conformance/programs.py, in one language,
on one backend; nothing of the call may be left once it returned."""

from __future__ import annotations

import pytest

from tests.conformance.programs import Scenario, cases, differences

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.mark.parametrize(("scenario", "language"), cases())
async def test_each_call_ends_as_the_contract_says(subject, scenario: Scenario, language: str):
    if scenario.real_only and not subject.real:
        pytest.skip(f"real backends only: {scenario.real_only}")

    result = await subject.shared.execute(
        scenario.program.source(language),
        language=language,
        stdin=scenario.stdin,
        timeout_seconds=scenario.timeout_seconds,
        memory_mb=scenario.memory_mb,
    )

    assert differences(scenario, language, result) == [], result.stderr[-2000:]
    assert await subject.leftovers(result.execution_id) == [], "the call returned, and left its sandbox behind"
