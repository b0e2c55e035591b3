"""Rank / energy analysis, FLOP and parameter accounting, reports, the CLI and the demo."""
