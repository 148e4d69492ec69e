"""Argument types shared by the commands."""

from __future__ import annotations

import argparse

from tidar_export.errors import TiDARError
from tidar_runtime.tokenizer import folder_tokenizer


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def prompt_ids(folder, text: str | None, ids: list[int] | None) -> list[int]:
    """--prompt-ids as given, or --prompt encoded with the folder's tokenizer (one of them is set:
    the commands check that before any I/O, see require_prompt)."""
    if ids is not None:
        return ids
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 reach argv as lone surrogates
        raise TiDARError("--prompt is not valid UTF-8 text") from None
    tokenizer = folder_tokenizer(folder)
    if tokenizer is None:
        raise TiDARError(f"{folder} has no tokenizer.json: pass --prompt-ids instead of --prompt")
    return tokenizer.encode(text).ids


def add_force_flag(p) -> None:
    p.add_argument("--force", action="store_true",
                   help="replace -o even if it is a non-empty folder that tidar-export did not write")


def require_prompt(args) -> None:
    if args.prompt is None and args.prompt_ids is None:
        raise TiDARError("give --prompt TEXT or --prompt-ids IDS")
