"""Write a synthetic bank: every chunk of customers, table by table, straight to Parquet parts."""

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tagml.features.synthetic.activity import digital_events_table, transactions_table
from tagml.features.synthetic.config import CHUNK_SIZE, DRIFT_SCENARIOS, BankConfig, drift_month_index
from tagml.features.synthetic.customers import Chunk, customers_table
from tagml.features.synthetic.holdings import balances_table, loans_table
from tagml.features.synthetic.labels import labels_table
from tagml.features.synthetic.shelf import consents_table, holdings_table, products_table


def generate_bank(config: BankConfig, out: Path) -> dict:
    """Write the contract tables for `config` under `out` (one Parquet part per chunk and table).

    Returns a summary (row counts, label shares, Bayes accuracy per tag), also written to
    `out/_truth/manifest.json`.
    """
    out = Path(out)
    tables = ("customers", "balances", "loans", "transactions", "digital_events", "tag_labels", "products", "holdings", "consents")
    for name in (*tables, "_truth"):
        target = out / name
        if target.exists():
            for old in target.glob("*.parquet"):
                old.unlink()
        target.mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(tables, 0)
    truth_parts: dict[str, list[pa.Table]] = {}
    n_chunks = math.ceil(config.customers / CHUNK_SIZE)
    for chunk in range(n_chunks):
        start = chunk * CHUNK_SIZE
        size = min(CHUNK_SIZE, config.customers - start)
        c = Chunk(config, chunk, start, size, np.arange(start, start + size))
        loans, loan_rows = loans_table(c)  # drawn straight after the latents: the draw order is the bank
        produced = {"customers": customers_table(c), "loans": loans, "balances": balances_table(c)}
        produced |= {"transactions": transactions_table(c, loan_rows), "digital_events": digital_events_table(c)}
        produced["tag_labels"], truth = labels_table(c)
        produced |= {"holdings": holdings_table(c, produced["balances"]), "consents": consents_table(c)}
        if chunk == 0:
            produced["products"] = products_table()
        for name, table in produced.items():
            pq.write_table(table, out / name / f"part-{chunk:05d}.parquet", compression="zstd")
            counts[name] += table.num_rows
        for tag, table in truth.items():
            truth_parts.setdefault(tag, []).append(table)
    summary = {"config": asdict(config), "rows": counts, "bayes_accuracy": {}, "label_counts": {}}
    for tag, parts in truth_parts.items():
        table = pa.concat_tables(parts)
        pq.write_table(table, out / "_truth" / f"{tag}.parquet", compression="zstd")
        probs = np.stack([table.column(c).to_numpy() for c in table.column_names if c.startswith("p_")], axis=1)
        summary["bayes_accuracy"][tag] = float(probs.max(axis=1).mean())
        summary["label_counts"][tag] = table.num_rows
    summary["drift"] = {"scenario": config.drift, "month_index": drift_month_index(config), "description": DRIFT_SCENARIOS.get(config.drift or "")}
    (out / "_truth" / "manifest.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
