"""fieldgate: the service (settings, app, HTTP routers, writer pipeline, store, CLI)."""
