"""Cross-cutting helpers: crypto, errors, logging, money."""
