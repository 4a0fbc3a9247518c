"""Scan-to-pay lane appliance: scan gun in, payment platforms out, LED and buzzer for the cashier."""

__version__ = "0.1.0"
