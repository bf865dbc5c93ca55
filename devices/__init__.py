"""The device domain: models of devices and series, credentials, payload formats."""
