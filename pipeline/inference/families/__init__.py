"""Model families ported natively to this project's transformers: one module per family."""
