"""Backends of the decode loop. Each imports its heavy dependency only when constructed."""
