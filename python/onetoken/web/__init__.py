"""The web layer: the control API's FastAPI app (app), its dependencies (deps) and one
route module per domain (routes). Routes check permissions and translate HTTP to domain
service calls; no domain imports this package."""
