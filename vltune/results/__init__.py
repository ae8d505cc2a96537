"""Result records (the only source of tables), their aggregation into tables and plots, and the report."""

from vltune.results.record import SCHEMA, config_hash, environment, read_record, write_json_atomic
from vltune.results.report import rebuild
from vltune.results.tables import Table, build_tables, collect, render_report, write_tables

__all__ = ["SCHEMA", "Table", "build_tables", "collect", "config_hash", "environment", "read_record", "rebuild",
           "render_report", "write_json_atomic", "write_tables"]
