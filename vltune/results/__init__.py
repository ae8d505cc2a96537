"""Result records (the only source of tables) and, later, aggregation and reports."""

from vltune.results.record import SCHEMA, config_hash, environment, read_record, write_json_atomic

__all__ = ["SCHEMA", "config_hash", "environment", "read_record", "write_json_atomic"]
