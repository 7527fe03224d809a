"""The Spark session tagml's Spark engine runs on (TAGML_ENGINE=spark), built from settings.

pyspark is imported only here and only when a session is asked for, so the embedded DuckDB default
never loads Spark or needs Java. One session per process: `SparkSession.builder.getOrCreate()` hands
back a running session (a test's, a notebook's) instead of starting a second JVM.
"""

import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

# Defaults that make local[N] behave like the embedded engine and keep the process off the network:
# UTC session time (dates and timestamps compare as DuckDB's do), no UI port, loopback driver,
# Arrow transfers for mapInArrow/toPandas, few shuffle partitions for one machine.
LOCAL_DEFAULTS: dict[str, str] = {
    "spark.sql.session.timeZone": "UTC",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.shuffle.partitions": "8",
    "spark.driver.memory": "4g",
    "spark.driver.bindAddress": "127.0.0.1",
    "spark.driver.host": "127.0.0.1",
}
# settings a cluster decides for itself (its own UI, hosts and memory): applied only to local masters
LOCAL_ONLY = ("spark.ui.enabled", "spark.driver.memory", "spark.driver.bindAddress", "spark.driver.host", "spark.sql.shuffle.partitions")


class SparkUnavailableError(RuntimeError):
    """TAGML_ENGINE=spark, but pyspark or its Java runtime is missing, or the master cannot be reached."""


def spark_conf(master: str, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The configuration a session for `master` starts with: the defaults above (cluster-owned ones only
    for local masters), then `overrides`."""
    local = master.startswith("local")
    conf = {k: v for k, v in LOCAL_DEFAULTS.items() if local or k not in LOCAL_ONLY}
    conf.update(overrides or {})
    return conf


def spark_session(master: str = "local[2]", app_name: str = "tagml", overrides: Mapping[str, str] | None = None) -> "SparkSession":
    """The process's Spark session (started on first use). Raises `SparkUnavailableError` naming what is missing."""
    try:
        from pyspark.sql import SparkSession
    except ImportError as exc:
        raise SparkUnavailableError("TAGML_ENGINE=spark needs pyspark: pip install 'tagml[spark]' (pyspark 4 and a Java 17 runtime)") from exc
    # Python workers run the same interpreter (and so the same tagml, xgboost, mlflow) as the driver
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.master(master).appName(app_name)
    for key, value in spark_conf(master, overrides).items():
        builder = builder.config(key, value)
    try:
        session = builder.getOrCreate()
    except Exception as exc:  # py4j/pyspark raise several unrelated types for a missing JVM or master
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SparkUnavailableError(f"cannot start Spark (master {master!r}): {first}. Spark 4 needs a Java 17 runtime (JAVA_HOME or java on PATH)") from exc
    session.sparkContext.setLogLevel("WARN")
    return session
