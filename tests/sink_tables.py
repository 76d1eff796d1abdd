"""The columns of the SQL sinks' table as an operator would create it by hand (the tests add
their own constraints, generated columns, triggers and policies to it)."""

PG = (
    'unique_event_id TEXT PRIMARY KEY, stream TEXT NOT NULL, "offset" TEXT NOT NULL, '
    "event_name TEXT, module_name TEXT, primary_key TEXT, hotel_id TEXT, event_timestamp TEXT, "
    "detail JSONB NOT NULL, resource JSONB, written_at DOUBLE PRECISION NOT NULL"
)
LITE = (
    "unique_event_id TEXT PRIMARY KEY, stream TEXT NOT NULL, offset TEXT NOT NULL, "
    "event_name TEXT, module_name TEXT, primary_key TEXT, hotel_id TEXT, event_timestamp TEXT, "
    "detail TEXT NOT NULL, resource TEXT, written_at REAL NOT NULL"
)
