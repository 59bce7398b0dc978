"""Where trial runs execute: the executor interface and the local executor."""
