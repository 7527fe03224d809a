"""Drift monitoring and re-evaluation decisions (no Dagster imports).

psi.py          set-based population stability index in DuckDB (every feature in one scan, per slice)
reference.py    what a model version is monitored against: the population on its training date
performance.py  realised performance once delayed labels have matured
report.py       the Evidently data-drift report on a fixed sample
measures.py     one tag's drift numbers: feature PSI, class PSI and shares per slice (nothing decided)
decision.py     whether a tag drifted: a pure function of its measures and its catalog drift spec
drift.py        one partition's drift for every model tag: measure -> decide -> record in the history
history.py      the drift history tables (Parquet partitions, DuckDB queries)
reevaluation.py which tags to re-evaluate: cursor, run keys and cooldown
"""
