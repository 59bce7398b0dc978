"""Helpers that tests share: real servers started on loopback, and nothing faked."""
