"""The exit codes of every command and the one table that maps the packages' named errors to them."""

from enum import IntEnum


class ExitCode(IntEnum):
    """The exit codes of every command (README, Commands)."""

    OK = 0
    UNEXPECTED = 1
    USAGE = 2  # a bad argument or option (Typer/click's own code)
    NOT_FOUND = 3  # unknown tag, customer, partition, model version
    CONFIG = 4  # invalid settings, catalog or input data; missing or unwritable home
    UNAVAILABLE = 5  # the MLflow store/server cannot be reached
    DRIFT = 6  # `tagml drift --fail-on-drift` found a drifted tag
    FAILED_RUN = 7  # a Dagster run (of the demo, ingest, train, score) failed without a named domain error
    BROKEN_PIPE = 141  # the reader of stdout went away (`tagml drift | head`): 128 + SIGPIPE
    INTERRUPTED = 130


# Named domain exceptions -> exit code, matched on the exception's class and its bases by
# "module.Class" so that no domain package (mlflow, dagster...) is imported just to compare.
EXIT_CODES: dict[str, ExitCode] = {
    "tagml.cli.errors.NotFoundError": ExitCode.NOT_FOUND,
    "tagml.scoring.store.TagStoreError": ExitCode.NOT_FOUND,
    "tagml.monitoring.history.DriftHistoryError": ExitCode.NOT_FOUND,
    "tagml.training.registry.RegistryError": ExitCode.NOT_FOUND,
    "tagml.monitoring.reference.DriftInputError": ExitCode.NOT_FOUND,
    "tagml.core.settings.SettingsError": ExitCode.CONFIG,
    "tagml.training.catalog.CatalogError": ExitCode.CONFIG,
    "tagml.features.raw.ContractError": ExitCode.CONFIG,
    "tagml.training.dataset.TrainingDataError": ExitCode.CONFIG,
    "tagml.features.snapshot.FeatureQualityError": ExitCode.CONFIG,
    "tagml.scoring.score.ScoringError": ExitCode.NOT_FOUND,  # no champion, no feature snapshot
    "tagml.features.column_audit.ColumnAuditError": ExitCode.CONFIG,
    "tagml.features.own_table.OwnTableSnapshotError": ExitCode.CONFIG,  # a bank's own table missing, unreadable or without the columns
    "tagml.scoring.rules.SliceError": ExitCode.CONFIG,
    "tagml.training.evaluate.DecisionError": ExitCode.CONFIG,
    "tagml.training.tracking.TrackingUnavailableError": ExitCode.UNAVAILABLE,
    "tagml.training.registry.RegistryUnavailableError": ExitCode.UNAVAILABLE,
    "tagml.training.registry.GateOverrideRequiredError": ExitCode.USAGE,
    "tagml.training.concurrency.TrainingInProgressError": ExitCode.UNAVAILABLE,
    "tagml.core.storage.WarehouseConfigError": ExitCode.CONFIG,
    "tagml.training.rule_predicates.RuleSyntaxError": ExitCode.CONFIG,
    "tagml.scoring.rules.RuleInputError": ExitCode.CONFIG,
    "tagml.core.files.CorruptFileError": ExitCode.CONFIG,
    "tagml.orchestration.commands.UnknownPartitionError": ExitCode.NOT_FOUND,
    "tagml.compliance.lifecycle.LifecycleError": ExitCode.USAGE,  # an illegal transition, four-eyes, a missing reason
    "tagml.compliance.consent.ConsentUnavailableError": ExitCode.CONFIG,  # a purpose needs consent and no consents table was delivered
    "tagml.compliance.consent.UnknownPurposeError": ExitCode.USAGE,
    "tagml.compliance.exports.ExportError": ExitCode.NOT_FOUND,  # an unknown tag, nothing published to export
    "tagml.compliance.erasure.ErasureRequestError": ExitCode.USAGE,
    "tagml.core.governance.GovernanceUnavailableError": ExitCode.UNAVAILABLE,
    "tagml.compliance.scan.ScanError": ExitCode.UNAVAILABLE,
    "tagml.training.model_card.ModelCardError": ExitCode.NOT_FOUND,
    "tagml.training.reproduce.ReproductionError": ExitCode.CONFIG,
    "tagml.scoring.online.OnlineStoreError": ExitCode.NOT_FOUND,  # the online store not loaded yet
    "tagml.scoring.online.OnlineStoreUnavailableError": ExitCode.UNAVAILABLE,  # its Postgres cannot be reached
    "tagml.serving.audiences.AudienceQueryError": ExitCode.CONFIG,
    "tagml.serving.audiences.AudienceError": ExitCode.NOT_FOUND,
    "tagml.serving.auth.ApiKeyError": ExitCode.USAGE,
}


class NotFoundError(LookupError):
    """Something the user named (a tag, a file) does not exist."""


class CommandFailed(RuntimeError):
    """A command did its work and reports a non-zero outcome (drift found, a failed run)."""

    def __init__(self, message: str, code: ExitCode):
        super().__init__(message)
        self.code = code


def exit_code_for(exc: BaseException) -> ExitCode:
    if isinstance(exc, CommandFailed):
        return exc.code
    for cls in type(exc).__mro__:
        code = EXIT_CODES.get(f"{cls.__module__}.{cls.__qualname__}")
        if code is not None:
            return code
    return ExitCode.UNEXPECTED


def exit_codes_by_class_name() -> dict[str, ExitCode]:
    """The code of each error class by its bare name, subclasses included: a failed Dagster step keeps only the
    class names of its error chain (no hierarchy), and UnscorableTagsError must answer as the ScoringError it is."""
    import importlib

    by_name: dict[str, ExitCode] = {}

    def add(cls: type, code: ExitCode) -> None:
        by_name.setdefault(cls.__name__, code)
        for sub in cls.__subclasses__():
            add(sub, EXIT_CODES.get(f"{sub.__module__}.{sub.__qualname__}", code))

    for qualified, code in EXIT_CODES.items():
        module, _, name = qualified.rpartition(".")
        by_name[name] = code
        add(getattr(importlib.import_module(module), name), code)
    return by_name


def one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines)[:2000] or type(exc).__name__
