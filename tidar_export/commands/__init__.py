"""Thin command modules of `tidar-export`: each parses its flags, calls the layer that does the
work, and prints. Each defines register(subparsers); heavy imports stay inside the command."""
