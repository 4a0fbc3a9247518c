"""The lane's uplink to head office (MQTT). `commands.py` answers head office's commands."""
