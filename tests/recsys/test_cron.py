"""KFP's six-field cron (recsys/config/cron.py): what it accepts and normalises, what it rejects and how
the message says so, and that params.yaml's ``pipeline.cron`` is checked when the params are loaded."""

from __future__ import annotations

import pytest

from recsys.config import ConfigError, kfp_cron, load_params
from tests.conftest import REPO_ROOT


@pytest.mark.parametrize(
    ("cron", "normalised"),
    [
        ("0 0 3 * * *", "0 0 3 * * *"),
        ("  0  30 2 * *   MON-FRI ", "0 30 2 * * MON-FRI"),
        ("0 */15 * * * ?", "0 */15 * * * ?"),
        ("0 0 9 1,15 JAN-JUN *", "0 0 9 1,15 JAN-JUN *"),
        ("@daily", "@daily"),
        ("@every 1h30m", "@every 1h30m"),
    ],
)
def test_kfp_cron_accepts(cron, normalised):
    assert kfp_cron(cron) == normalised


@pytest.mark.parametrize(
    ("cron", "message"),
    [
        ("0 3 * * *", r"has 5 field\(s\); KFP's cron has 6, seconds first.*did you mean '0 0 3 \* \* \*'"),
        ("0 0 3 * * * 2026", r"has 7 field\(s\)"),
        ("", r"has 0 field\(s\)"),
        ("0 60 3 * * *", r"minute value '60' is out of range \(allowed 0-59\)"),
        ("0 0 24 * * *", r"hour value '24' is out of range"),
        ("0 0 3 0 * *", r"day of month value '0' is out of range \(allowed 1-31\)"),
        ("0 0 3 * 13 *", r"month value '13' is out of range \(allowed 1-12 or JAN-DEC\)"),
        ("0 0 3 * * 7", r"day of week value '7' is out of range"),
        ("0 0 3 * * FUNDAY", r"day of week value 'FUNDAY'"),
        ("0 0 5-3 * * *", r"hour field '5-3': the range runs backwards"),
        ("0 */0 * * * *", r"step after '/' must be a positive integer"),
        ("? 0 3 * * *", r"second value '\?'"),
        ("@fortnightly", r"has 1 field\(s\)"),
    ],
)
def test_kfp_cron_rejects_with_a_clear_message(cron, message):
    with pytest.raises(ValueError, match=message):
        kfp_cron(cron)


def test_params_cron_is_validated_at_load():
    with pytest.raises(ConfigError, match=r"pipeline\.cron: .*has 5 field"):
        load_params(REPO_ROOT / "params.yaml", overrides={"pipeline.cron": "0 3 * * *"})
