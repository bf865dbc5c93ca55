"""HTTP routers: thin handlers, one service call each."""
