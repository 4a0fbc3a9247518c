"""Head office: the reference subscriber of every lane's MQTT messages (docs/mqtt.md).

* `config.py`: head office's own `[hq]` config (no `[terminal]`: head office is not a lane);
* `store.py`: the database (SQLite or PostgreSQL by URL) and its idempotent writes;
* `ingest.py`: `appliance hq ingest`, the shared-subscription consumer (ack after commit);
* `report.py`: `appliance hq report`, a business day's volume and the lanes needing attention.
"""
