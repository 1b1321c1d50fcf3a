"""The bridge to the Rust engine: snapshot builder and supervisor (lifecycle, record pump)."""
