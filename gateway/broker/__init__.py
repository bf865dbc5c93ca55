"""The broker side of device identity: Mosquitto dynamic security, kept from the registry."""
