"""Differential fuzzing: our validator accepts exactly what the reference reader accepts.

CI runs a few thousand cases with a fixed seed; ``make fuzz`` runs 100,000+ fresh ones and counts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from .safetensors_fuzz import AGREE, cases, classify

CI_EXAMPLES = 2500

# Deep-nesting and 5,000-digit cases make hypothesis warn about long reprs; they are the point here.
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")


@pytest.fixture(scope="module")
def case_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "case.safetensors"


@settings(max_examples=CI_EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(blob=cases())
def test_validator_agrees_with_the_reference_reader(case_path: Path, blob: bytes) -> None:
    outcome, detail = classify(blob, case_path)
    assert outcome == AGREE, f"{outcome}: {detail} for {blob[:300]!r}"
