"""Test support shipped with the package: fake provider servers on loopback."""
