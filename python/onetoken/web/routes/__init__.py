"""One module of routes per domain, each exporting `router`."""
