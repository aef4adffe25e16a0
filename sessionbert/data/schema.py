"""The one event schema every data source is turned into (simulator, public datasets, users' own logs)."""
from __future__ import annotations

import pyarrow as pa

#: Required columns of an event table, in order.
REQUIRED = ("user_id", "session_id", "timestamp", "service", "page")
#: Optional columns that the serialiser uses when present.
OPTIONAL = ("page_title", "action", "region")

EVENT_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("session_id", pa.string()),
        ("timestamp", pa.timestamp("ms", tz="UTC")),
        ("service", pa.string()),
        ("page", pa.string()),
        ("page_title", pa.string()),
        ("action", pa.string()),
        ("region", pa.string()),
    ]
)

#: Billing: one row per (user, month, billed service).
BILLING_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("month", pa.string()),  # "YYYY-MM"
        ("service", pa.string()),
        ("spend_usd", pa.float64()),
    ]
)
