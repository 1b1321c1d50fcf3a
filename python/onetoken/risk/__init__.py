"""Risk detection on what ingestion took: key-risk events (keyrisk) and the detectors
(detectors), fed the ingested batches over the event bus by onetoken.control."""
