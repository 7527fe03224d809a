"""The erasure job: erase a list of customers from every store of the home (tagml.compliance.erasure).

The ids never enter Dagster: the run config names a request file (one id a line) under
`<governance dir>/erasure_requests/`, which the job deletes once the erasure is verified. The run
storage keeps the file's name, the receipt id and counts only.
"""

import dagster as dg
from pydantic import Field

from tagml.compliance.erasure import erase, read_id_file, request_file
from tagml.core.settings import Settings

ERASURE_JOB = "erase_customers_job"


class ErasureRequestConfig(dg.Config):
    request_file: str = Field(description="A file of customer ids, one a line, under <governance dir>/erasure_requests/ (a relative name is taken from there).")
    reason: str = Field(description="Why (a request reference): part of the receipt.")
    requested_by: str = Field(description="Who asked for the erasure: part of the receipt.")


def build_erasure_job(settings: Settings) -> dg.JobDefinition:
    @dg.op(name="erase_customers", description="Erase the customers of a request file from every store; record the receipt; delete the request.")
    def erase_customers(context: dg.OpExecutionContext, config: ErasureRequestConfig) -> dg.Output[str]:
        path = request_file(settings, config.request_file)
        receipt = erase(settings, read_id_file(path), config.requested_by, config.reason)
        metadata = {
            "erasure_id": receipt.erasure_id,
            "customers": receipt.customers,
            "customers_found": receipt.customers_found,
            "rows_removed": receipt.rows_removed,
            "model_versions_trained_on_them": len(receipt.model_versions),
            "verified": receipt.verified,
            "stores_scanned": receipt.verification["stores_scanned"],
            "receipt": dg.MetadataValue.path(receipt.receipt_path),
        }
        if not receipt.verified:
            raise dg.Failure(
                description=f"erasure {receipt.erasure_id} is not verified: the customers still appear in {', '.join(receipt.verification['stores_with_hits'])}; "
                "the request file is kept",
                metadata=metadata,
            )
        path.unlink()
        context.log.info(f"erasure {receipt.erasure_id}: {receipt.customers} customers, {receipt.rows_removed} rows removed, verified")
        return dg.Output(receipt.erasure_id, metadata=metadata)

    @dg.job(name=ERASURE_JOB, executor_def=dg.in_process_executor, description="Erase the customers of a request file from every store tagml writes.")
    def erasure_job() -> None:
        erase_customers()

    return erasure_job
