"""Result records (the only source of tables), their aggregation into tables and plots, and the report."""

from vltune.results.formats import Table
from vltune.results.record import (
    SCHEMA,
    Record,
    environment,
    find_records,
    load_record,
    read_record,
    write_json_atomic,
)
from vltune.results.report import build_tables, rebuild, render_report, write_tables

__all__ = ["SCHEMA", "Record", "Table", "build_tables", "environment", "find_records", "load_record", "read_record",
           "rebuild", "render_report", "write_json_atomic", "write_tables"]
