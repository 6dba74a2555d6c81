"""Routes and handlers: where the HTTP layer, the store, realtime delivery and the cluster meet."""
