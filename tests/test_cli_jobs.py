"""`tagml ingest / train / score` through the CLI's entry point, against a real home (a small generated
bank, a real MLflow SQLite store and Dagster instance): each runs its job on the home's instance, prints
what it produced, and a failed run or a bad argument is one named line with its exit code."""

import json
import os

import dagster as dg
import pytest
from conftest import write_test_catalog

from tagml.cli import main
from tagml.cli.errors import ExitCode
from tagml.core.settings import Settings

AS_OF = "2026-10-31"  # the newest month end of the generated bank (--end-month 2026-10)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A home with a 600-customer, 4-month bank and a catalog of one model tag and the rule tags."""
    root = tmp_path_factory.mktemp("cli_jobs")
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("TAGML_") or n in ("MLFLOW_TRACKING_URI", "DAGSTER_HOME")]:
            patch.delenv(name)
        patch.setenv("TAGML_HOME", str(root / "home"))
        patch.setenv("TAGML_CATALOG", str(write_test_catalog(root / "catalog.yaml", ("risk_appetite", "value_tier", "lifecycle_stage"))))
        assert main(["generate", "--customers", "600", "--months", "4", "--seed", "3"]) == 0
        yield Settings.from_env()


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("tagml:")]


def _runs(settings: Settings) -> list[tuple[str, str, str | None]]:
    with dg.DagsterInstance.from_config(str(settings.dagster_home)) as instance:
        return [(r.job_name, r.status.value, r.tags.get("dagster/partition")) for r in reversed(instance.get_runs())]


@pytest.mark.slow  # four real runs and two failed ones (~1-2 minutes on a shared 2-core machine)
def test_ingest_train_and_score_run_their_jobs_on_the_home_instance(home, capsys, tmp_path):
    code, out, err = _run(capsys, "ingest")
    assert code == 0, err
    assert "raw_ingest_job: ok" in out and "customers" in out and "600 rows" in out and "PII columns dropped: full_name" in out

    # before any training the scoring run fails: one line naming the step and the tag, the not-found code
    code, out, err = _run(capsys, "score", "--as-of", AS_OF)
    assert code == ExitCode.NOT_FOUND and out == ""
    (line,) = _errors(err)
    assert "nightly_scoring_job failed at step customer_tags" in line and "'risk_appetite'" in line and "champion" in line

    # a training step that fails on its input: one line naming the step and the tag, the code of the named error
    strict = write_test_catalog(tmp_path / "kyc_only.yaml", ("risk_appetite",))
    strict.write_text(strict.read_text().replace("- risk_questionnaire", "- kyc"))  # no risk_appetite label comes from KYC
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TAGML_CATALOG", str(strict))
        code, out, err = _run(capsys, "train", "risk_appetite", "--trials", "1", "--as-of", AS_OF)
    assert code == ExitCode.CONFIG and out == ""
    (line,) = _errors(err)
    assert (
        "train_risk_appetite_job failed at step risk_appetite__training_set: TrainingDataError: tag 'risk_appetite': no usable labels known on 2026-10-31"
        in line
    )

    code, out, err = _run(capsys, "train", "risk_appetite", "--trials", "1", "--as-of", AS_OF, "--seed", "1")
    assert code == 0, err
    assert "train_risk_appetite_job: ok" in out and f"known on {AS_OF}" in out and "risk_appetite v1" in out
    assert "test:     macro_f1=" in out and "baseline: macro_f1=" in out and "gate: promoted (champion before: none)" in out
    assert "MLflow run: http" in out and "Downloading artifacts" not in err and not _errors(err)

    code, out, err = _run(capsys, "score", "--as-of", AS_OF, "--json")
    assert code == 0, err
    scored = json.loads(out)
    assert scored["success"] and scored["failure"] is None and scored["as_of"] == AS_OF
    by_tag = {t["tag"]: t for t in scored["tags"]}
    assert set(by_tag) == {"risk_appetite", "value_tier", "lifecycle_stage"}
    assert all(t["customers"] == scored["customers"] for t in by_tag.values()) and scored["rows"] == 3 * scored["customers"]
    assert by_tag["risk_appetite"]["producer"] == "tagml-risk_appetite/1" and [d["tag"] for d in scored["drift"]] == ["risk_appetite"]
    assert scored["checks"]["customer_tags/coverage"] is True

    code, out, err = _run(capsys, "score", "--as-of", AS_OF, "--no-drift")
    assert code == 0, err
    assert "risk_appetite" in out and "value_tier" in out and "drift (" not in out

    code, out, err = _run(capsys, "score", "--as-of", AS_OF, "--no-drift", "--skip-tag", "risk_appetite", "--skip-reason", "questionnaire feed late", "--json")
    assert code == 0, err
    skipped = json.loads(out)
    assert {t["tag"] for t in skipped["tags"]} == {"value_tier", "lifecycle_stage"} and skipped["rows"] == 2 * skipped["customers"]
    assert skipped["skipped_tags"] == {"risk_appetite": "questionnaire feed late"}

    runs = _runs(home)
    assert runs == [
        ("raw_ingest_job", "SUCCESS", None),
        ("nightly_scoring_job", "FAILURE", AS_OF),
        ("train_risk_appetite_job", "FAILURE", None),
        ("train_risk_appetite_job", "SUCCESS", None),
        ("nightly_scoring_job", "SUCCESS", AS_OF),
        ("nightly_scoring_job", "SUCCESS", AS_OF),
        ("nightly_scoring_job", "SUCCESS", AS_OF),
    ]


@pytest.mark.parametrize(
    ("args", "code", "named"),
    [
        (("train", "nope"), ExitCode.NOT_FOUND, "no tag 'nope' in the catalog"),
        (("train", "value_tier"), ExitCode.NOT_FOUND, "is a rule tag, not a model tag"),
        (("train", "risk_appetite", "--as-of", "2026-02-30"), ExitCode.USAGE, "'2026-02-30' is not a date"),
        (("train", "risk_appetite", "--trials", "0"), ExitCode.USAGE, "--trials"),
        (("score", "--as-of", "yesterday"), ExitCode.USAGE, "'yesterday' is not a date"),
        (("score",), ExitCode.USAGE, "--as-of"),
        (("score", "--as-of", "2020-01-01"), ExitCode.NOT_FOUND, "no as_of partition 2020-01-01: the daily partitions run from 2024-01-01"),
        (("score", "--as-of", "2026-10-31", "--skip-tag", "risk_appetite"), ExitCode.USAGE, "--skip-tag needs a --skip-reason"),
        (("score", "--as-of", "2026-10-31", "--skip-tag", "nope", "--skip-reason", "r"), ExitCode.NOT_FOUND, "no tag 'nope' in the catalog"),
    ],
)
def test_bad_tags_and_dates_are_named_before_any_run(home, capsys, args, code, named):
    before = len(_runs(home))
    got, out, err = _run(capsys, *args)
    assert got == code and named in err and out == ""
    if args[:2] == ("train", "nope"):
        assert "known: risk_appetite, value_tier, lifecycle_stage" in err
    assert len(_runs(home)) == before


def test_each_command_says_which_job_it_runs(capsys):
    for command, job in (("ingest", "raw_ingest_job"), ("train", "train_<TAG>_job"), ("score", "nightly_scoring_job")):
        code, out, _ = _run(capsys, command, "--help")
        assert code == 0 and job in out and "--json" in out, command


def test_a_failed_steps_error_answers_with_the_code_of_its_nearest_mapped_class():
    """A Dagster step failure keeps only class names: a subclass (UnscorableTagsError of ScoringError) exited 7
    instead of its parent's code until the subclasses were mapped too."""
    from tagml.cli.errors import exit_codes_by_class_name

    codes = exit_codes_by_class_name()
    assert codes["UnscorableTagsError"] == codes["ScoringError"] == ExitCode.NOT_FOUND
    assert codes["CoverageError"] == ExitCode.NOT_FOUND and codes["OwnTableSnapshotError"] == ExitCode.CONFIG
    assert codes["TrainingDataError"] == ExitCode.CONFIG
