"""The system of record: the schema, the engine, and every SQL statement the package runs."""
