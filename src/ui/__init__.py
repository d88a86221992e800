"""`loralab ui`: a local web dashboard over the same files and functions as the CLI (docs/ui.md)."""
