"""fieldgate: the service (settings, app, HTTP routers, writer, store, CLI)."""
