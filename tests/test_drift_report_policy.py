"""The Evidently report policy (which tags' reports run for an as_of) and a backfilled range's verdicts for the sensor: pure functions."""

from datetime import date

import pytest

from tagml.core.settings import Settings
from tagml.monitoring.reevaluation import BY_AS_OF, events_from_result
from tagml.monitoring.report_policy import plan_reports, report_policy

SATURDAY, SUNDAY = date(2026, 10, 31), date(2026, 11, 1)
QUIET = {"risk_appetite": False, "life_stage": False}
ONE_DRIFTED = {"risk_appetite": True, "life_stage": False}


def test_default_policy_reports_the_drifted_tag_only_on_an_ordinary_night():
    assert plan_reports("on_drift_or_weekly", SATURDAY, QUIET).tags == ()
    assert "no tag drifted" in plan_reports("on_drift_or_weekly", SATURDAY, QUIET).why
    plan = plan_reports("on_drift_or_weekly", SATURDAY, ONE_DRIFTED)
    assert plan.tags == ("risk_appetite",) and "risk_appetite" in plan.why


def test_default_policy_reports_every_tag_on_the_weekly_day():
    plan = plan_reports("on_drift_or_weekly", SUNDAY, QUIET)
    assert plan.tags == ("life_stage", "risk_appetite") and "Sunday" in plan.why
    assert plan_reports("on_drift_or_weekly", SATURDAY, QUIET, weekday=5).tags == ("life_stage", "risk_appetite")
    assert plan_reports("on_drift", SUNDAY, QUIET).tags == ()


def test_always_and_never_and_the_old_booleans():
    assert plan_reports("always", SATURDAY, QUIET).tags == plan_reports(True, SATURDAY, QUIET).tags == ("life_stage", "risk_appetite")
    assert plan_reports("never", SUNDAY, ONE_DRIFTED).tags == plan_reports(False, SUNDAY, ONE_DRIFTED).tags == ()


def test_an_unknown_policy_or_weekday_is_named():
    with pytest.raises(ValueError, match="unknown drift report policy 'weekly'"):
        report_policy("weekly")
    with pytest.raises(ValueError, match="weekday 7"):
        plan_reports("on_drift_or_weekly", SUNDAY, QUIET, weekday=7)


def test_settings_knobs_default_and_validate(tmp_path):
    settings = Settings.from_env({"TAGML_HOME": str(tmp_path)})
    assert (settings.drift_report, settings.drift_report_weekday) == ("on_drift_or_weekly", 6)
    with pytest.raises(Exception, match="TAGML_DRIFT_REPORT"):
        Settings.from_env({"TAGML_HOME": str(tmp_path), "TAGML_DRIFT_REPORT": "sometimes"})


def test_a_backfilled_range_gives_each_partition_its_own_night_verdicts():
    by_as_of = {
        BY_AS_OF: {"2026-10-30": {"risk_appetite": {"drifted": False, "reasons": []}}, "2026-10-31": {"risk_appetite": {"drifted": True, "reasons": ["x"]}}}
    }
    assert [(e.tag, e.drifted, e.reasons) for e in events_from_result(7, date(2026, 10, 31), by_as_of)] == [("risk_appetite", True, ("x",))]
    assert [e.drifted for e in events_from_result(6, date(2026, 10, 30), by_as_of)] == [False]
    # one night's metadata, as before
    assert [e.drifted for e in events_from_result(5, SATURDAY, {"risk_appetite": {"drifted": True, "reasons": []}})] == [True]
